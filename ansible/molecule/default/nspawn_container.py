"""Boot and power off the scenario's container (molecule create and destroy).

``create STATE_DIR`` boots systemd-nspawn over the cached Debian 12 root of the system tests
(``tests/system/image.py``) with ``--boot --volatile=overlay`` on the host's network, the local
apt repository of ``bin/build-debs`` read-only at /srv/byteleap-debs and a host cache read-write
at /var/cache/apt/archives (reruns do not download again), then writes STATE_DIR/nspawn.json and
STATE_DIR/leader (the PID the ``nspawn`` connection plugin enters). ``destroy STATE_DIR`` powers
it off (SIGKILL after a timeout) and removes its cgroups. Both print one JSON line:
``{"changed": bool, ...}``.

Environment: BYTELEAP_DEBS_DIR (default <repo>/build/debs), BYTELEAP_APT_ARCHIVES (default
$BYTELEAP_SYSTEM_CACHE/apt-archives), BYTELEAP_SYSTEM_CACHE (see image.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.system.container import (  # noqa: E402 - the repository root is on sys.path now
    ContainerError,
    Detached,
    start_detached,
    stop_detached,
)
from tests.system.image import CACHE_DIR, ImageError, ensure_image, missing_tools  # noqa: E402
from tests.system.units import DEBS_DIR, REPO_INSIDE  # noqa: E402

STATE_FILE = "nspawn.json"
LEADER_FILE = "leader"
APT_ARCHIVES_INSIDE = "/var/cache/apt/archives"


def _load(state_dir: Path) -> Detached | None:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    return Detached(**{**data, "cgroups": tuple(data["cgroups"])})


def create(state_dir: Path) -> dict[str, object]:
    if missing := missing_tools():
        raise ContainerError(f"missing {', '.join(missing)} (apt-get install {' '.join(missing)})")
    if _load(state_dir) is not None:
        raise ContainerError(f"{state_dir / STATE_FILE} exists: run molecule destroy first")
    debs = Path(os.environ.get("BYTELEAP_DEBS_DIR", str(DEBS_DIR)))
    if not (debs / "Packages").is_file():
        raise ContainerError(f"no apt repository in {debs}: run bin/build-debs (make debs) first")
    archives = Path(os.environ.get("BYTELEAP_APT_ARCHIVES", str(CACHE_DIR / "apt-archives")))
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    root = ensure_image()
    state_dir.mkdir(parents=True, exist_ok=True)
    detached = start_detached(
        root,
        f"byteleap-molecule-{os.getpid()}",
        state_dir / "console.log",
        binds=((debs, REPO_INSIDE),),
        binds_rw=((archives, APT_ARCHIVES_INSIDE),),
        private_network=False,
    )
    (state_dir / STATE_FILE).write_text(json.dumps(dataclasses.asdict(detached)))
    (state_dir / LEADER_FILE).write_text(f"{detached.leader}\n")
    return {"changed": True, "leader": detached.leader, "root": str(root)}


def destroy(state_dir: Path) -> dict[str, object]:
    detached = _load(state_dir)
    if detached is None:
        return {"changed": False, "clean": True}
    clean = stop_detached(detached)
    (state_dir / LEADER_FILE).unlink(missing_ok=True)
    (state_dir / STATE_FILE).unlink()
    return {"changed": True, "clean": clean}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("create", "destroy"):
        print(f"usage: {argv[0]} create|destroy STATE_DIR", file=sys.stderr)
        return 2
    state_dir = Path(argv[2])
    try:
        result = create(state_dir) if argv[1] == "create" else destroy(state_dir)
    except (ContainerError, ImageError, OSError) as exc:
        print(f"{argv[1]}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
