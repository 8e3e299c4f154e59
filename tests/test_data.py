"""The data the tests and tools read is carried by the repository, complete and unaltered."""
import hashlib
from pathlib import Path

from helpers import DATA

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "data" / "MANIFEST.sha256"


def _manifest() -> dict[str, str]:
    return {rel: digest for digest, rel in (line.split(None, 1) for line in MANIFEST.read_text().splitlines())}


def test_every_listed_file_is_present_and_unaltered():
    entries = _manifest()
    assert len(entries) >= 30
    for rel, digest in entries.items():
        path = ROOT / rel
        assert path.is_file(), f"{rel} is listed in the manifest but missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{rel} differs from its copied version"


def test_every_data_file_is_listed():
    listed = set(_manifest())
    folders = [ROOT / d for d in DATA.values()] + [ROOT / "bench" / "data"]
    present = {p.relative_to(ROOT).as_posix() for d in folders for p in d.rglob("*") if p.is_file()}
    assert present - listed == set(), "data files not in tests/data/MANIFEST.sha256 (run scripts/sync_data.py)"


def test_nothing_reads_outside_the_repository():
    """No test, package module or tool refers to the shared folder beside the clone."""
    offenders = []
    for folder in ("tests", "piip", "piip_kernels", "bench", "scripts", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("sync_data.py", "test_data.py"):
                continue  # the copier itself, and this test
            text = path.read_text()
            if '"shared"' in text or "'shared'" in text or "../shared" in text:
                offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []
