"""`ai-service supervisor-config`: the GPU split written as supervisord's include, GPU
detection through `nvidia-smi`, and the parent watch that stops an orphaned worker.

The generator runs as the real command in a bare environment (``env -i`` style); its
output is read back by configparser and by supervisord's own config loader.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ai_service.worker import ParentWatch
from tests.support.procs import REPO

AI_SERVICE = str(Path(sys.executable).parent / "ai-service")


def bare_env(tmp_path: Path, *path: Path, **extra: str) -> dict[str, str]:
    """Only PATH and HOME, as in a fresh shell with nothing exported; PATH holds only ``path``."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": os.pathsep.join(str(p) for p in (*path, empty)), "HOME": str(tmp_path), **extra}


def generate(tmp_path: Path, *flags: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AI_SERVICE, "supervisor-config", *flags], cwd=cwd or tmp_path,
                          env=env if env is not None else bare_env(tmp_path), capture_output=True, text=True,
                          timeout=60)


def programs(text: str) -> dict[str, configparser.SectionProxy]:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    group = [name for name in parser["group:ai"]["programs"].split(",") if name]
    sections = {s.split(":", 1)[1]: parser[s] for s in parser.sections() if s.startswith("program:")}
    assert group == list(sections), (group, list(sections))
    return sections


def environment(section: configparser.SectionProxy) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in section["environment"].split(","):
        key, _, value = item.partition("=")
        out[key] = value.strip('"')
    return out


def fake_nvidia_smi(directory: Path, body: str) -> Path:
    """An explicit fake: a shell script named nvidia-smi in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return directory


TWO_GPUS = """\
case "$*" in
  *--query-gpu=index,uuid,name*) printf '0, GPU-aaaa-1111, NVIDIA H200\\n1, GPU-bbbb-2222, NVIDIA H200\\n' ;;
  *-L*) printf 'GPU 0: NVIDIA H200 (UUID: GPU-aaaa-1111)\\nGPU 1: NVIDIA H200 (UUID: GPU-bbbb-2222)\\n' ;;
  *) exit 2 ;;
esac
"""

ONLY_LIST = """\
case "$*" in
  *-L*) printf 'GPU 0: Tesla T4 (UUID: GPU-cccc)\\nGPU 1: Tesla T4 (UUID: GPU-dddd)\\n'
        printf 'GPU 2: Tesla T4 (UUID: GPU-eeee)\\n' ;;
  *) echo "Field \\"uuid\\" is not a valid field to query." >&2; exit 2 ;;
esac
"""

NO_DRIVER = """\
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""


def test_an_8_gpu_split_gives_every_program_its_own_gpu_port_and_worker_name(tmp_path: Path) -> None:
    out = tmp_path / "deploy" / "supervisor.d" / "workers.conf"
    result = generate(tmp_path, "--train-gpus", "0-3", "--infer-gpus", "4-7", "--convert-gpus", "4",
                      "--output", str(out))
    assert result.returncode == 0, result.stderr
    got = programs(out.read_text())
    assert list(got) == ["train-gpu0", "train-gpu1", "train-gpu2", "train-gpu3", "convert-gpu4",
                         "infer-gpu4", "infer-gpu5", "infer-gpu6", "infer-gpu7"]
    ports = {"train": 9100, "convert": 9200, "infer": 9300}
    stopwait = {"train": "60", "convert": "600", "infer": "30"}
    for name, section in got.items():
        op, gpu = name.split("-gpu")
        env = environment(section)
        assert env["CUDA_VISIBLE_DEVICES"] == gpu, name
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["METRICS_PORT"] == str(ports[op] + int(gpu)), name
        assert env["HTTP_PORT"] == str(ports[op] - 1000 + int(gpu)), name  # 81nn, 82nn, 83nn
        assert env["WORKER_NAME"] == "%(host_node_name)s/%(program_name)s"
        assert section["command"] == f"%(here)s/../.venv/bin/ai-service worker {op}"
        assert section["process_name"] == "%(program_name)s"
        assert section["numprocs"] == "1"
        assert section["exitcodes"] == "0,2"
        assert section["autorestart"] == "unexpected"
        assert section["stopwaitsecs"] == stopwait[op]
        assert section["stopsignal"] == "TERM"
        assert section["stdout_logfile"] == "%(here)s/../logs/%(program_name)s.log"

    # supervisord's own loader, from the repository's supervisord.conf beside the include:
    # names, expanded paths and environments as the processes will get them.
    from supervisor.options import ServerOptions

    shutil.copy(REPO / "supervisord.conf", tmp_path / "deploy" / "supervisord.conf")
    (tmp_path / "deploy" / "logs").mkdir()
    options = ServerOptions()
    options.realize(args=["-c", str(tmp_path / "deploy" / "supervisord.conf")])
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {"ai", "dashboard"}  # the workers, and supervisord.conf's own dashboard program
    group = groups["ai"]
    deploy = tmp_path / "deploy"
    loaded = {p.name: p for p in group.process_configs}
    assert set(loaded) == set(got)
    infer5 = loaded["infer-gpu5"]
    assert infer5.environment["CUDA_VISIBLE_DEVICES"] == "5"
    assert infer5.environment["METRICS_PORT"] == "9305"
    assert infer5.environment["WORKER_NAME"].endswith("/infer-gpu5")
    assert Path(infer5.command.split()[0]).resolve() == (deploy / ".venv" / "bin" / "ai-service").resolve()
    assert Path(infer5.stdout_logfile).resolve() == (deploy / "logs" / "infer-gpu5.log").resolve()
    assert Path(infer5.directory).resolve() == deploy.resolve()


def test_gpus_a_fake_nvidia_smi_lists_get_one_worker_of_each_kind_and_cuda_visible_devices_narrows_them(
    tmp_path: Path,
) -> None:
    smi = fake_nvidia_smi(tmp_path / "bin", TWO_GPUS)
    result = generate(tmp_path, "-o", "-", env=bare_env(tmp_path, smi))
    assert result.returncode == 0, result.stderr
    got = programs(result.stdout)
    assert list(got) == ["train-gpu0", "train-gpu1", "convert-gpu0", "convert-gpu1", "infer-gpu0", "infer-gpu1"]
    assert {n: environment(s)["CUDA_VISIBLE_DEVICES"] for n, s in got.items()} == {
        "train-gpu0": "0", "train-gpu1": "1", "convert-gpu0": "0", "convert-gpu1": "1",
        "infer-gpu0": "0", "infer-gpu1": "1"}
    assert "nvidia-smi lists 2 GPU(s)" in result.stdout

    # A kind given on the command line keeps its list; the others follow the detection.
    result = generate(tmp_path, "-o", "-", "--convert-gpus", "none", "--infer-gpus", "1",
                      env=bare_env(tmp_path, smi))
    assert list(programs(result.stdout)) == ["train-gpu0", "train-gpu1", "infer-gpu1"]

    # CUDA_VISIBLE_DEVICES in the generating shell, by index or by UUID, narrows the GPUs.
    for visible in ("1", "GPU-bbbb-2222"):
        result = generate(tmp_path, "-o", "-", env=bare_env(tmp_path, smi, CUDA_VISIBLE_DEVICES=visible))
        assert list(programs(result.stdout)) == ["train-gpu1", "convert-gpu1", "infer-gpu1"], visible

    # An nvidia-smi that cannot --query-gpu: its -L list is used.
    older = fake_nvidia_smi(tmp_path / "older", ONLY_LIST)
    result = generate(tmp_path, "-o", "-", env=bare_env(tmp_path, older))
    assert result.returncode == 0, result.stderr
    assert [n for n in programs(result.stdout) if n.startswith("train")] == ["train-gpu0", "train-gpu1",
                                                                              "train-gpu2"]


def test_without_a_usable_nvidia_smi_it_is_one_cpu_worker_of_each_kind_that_sees_no_gpu(tmp_path: Path) -> None:
    for env in (bare_env(tmp_path), bare_env(tmp_path, fake_nvidia_smi(tmp_path / "broken", NO_DRIVER))):
        result = generate(tmp_path, "-o", "-", env=env)
        assert result.returncode == 0, result.stderr
        got = programs(result.stdout)
        assert list(got) == ["train-cpu0", "convert-cpu0", "infer-cpu0"]
        assert all(environment(s)["CUDA_VISIBLE_DEVICES"] == "" for s in got.values())
        assert [environment(s)["METRICS_PORT"] for s in got.values()] == ["9100", "9200", "9300"]
    assert "couldn't communicate with the NVIDIA driver" in result.stdout  # said in the header


def test_bad_gpu_lists_and_a_directory_without_supervisord_conf_exit_2_with_the_reason(tmp_path: Path) -> None:
    for flags, reason in (
        (["--train-gpus", "3-1"], "runs backwards"),
        (["--infer-gpus", "gpu0"], "is not a GPU list"),
        (["--convert-gpus", "100"], "up to 99"),
        (["--train-gpus", "none", "--convert-gpus", "none", "--infer-gpus", "none"], "nothing to run"),
    ):
        result = generate(tmp_path, *flags, "-o", "-")
        assert result.returncode == 2, (flags, result.stderr)
        assert reason in result.stderr, (flags, result.stderr)
        assert result.stdout == ""
    result = generate(tmp_path, "--train-gpus", "0")  # the default output, from a directory with no config
    assert result.returncode == 2, result.stderr
    assert "no supervisord.conf here" in result.stderr, result.stderr
    assert not (tmp_path / "supervisor.d").exists()


def test_supervisor_config_is_fast_and_imports_no_torch(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "t0 = time.monotonic()\n"
        "from ai_service import cli\n"
        "assert cli.main(['supervisor-config', '--train-gpus', '0-1', '-o', 'out.conf']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics', 'torchvision'))\n"
        "assert not heavy, heavy\n"
        "print(f'ok {time.monotonic() - t0:.2f}')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            env={**bare_env(tmp_path), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok"), result.stdout + result.stderr
    assert float(result.stdout.split()[1]) < 3.0, result.stdout
    assert "[program:train-gpu1]" in (tmp_path / "out.conf").read_text()


def test_make_install_writes_the_include_only_when_it_is_missing(tmp_path: Path) -> None:
    target = tmp_path / "supervisor.d" / "workers.conf"
    stamp = tmp_path / "installed"  # a fresh stand-in for .venv/.installed: nothing to (re)install
    stamp.touch()

    def plan() -> str:  # -n: print what would run, run nothing
        done = subprocess.run(["make", "-n", "-C", str(REPO), "install", f"WORKERS_CONF={target}",
                               f"STAMP={stamp}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"ai-service supervisor-config --output {target}" in plan()
    target.parent.mkdir(parents=True)
    target.write_text("; an operator's split\n")
    assert "supervisor-config" not in plan()


def test_the_parent_watch_fires_at_once_when_the_parent_died_before_it_was_armed() -> None:
    # The parent read at start is not today's parent: it died in between (before prctl).
    fired: list[str] = []
    done = threading.Event()

    def on_death(why: str) -> None:
        fired.append(why)
        done.set()

    watch = ParentWatch(parent=os.getppid() + 1_000_000)
    watch.start(on_death)
    assert done.wait(2.0), "the watch did not notice"
    assert "is gone" in fired[0]

    # A living parent is left alone.
    alive = ParentWatch(parent=os.getppid())
    called: list[str] = []
    alive.start(called.append)
    time.sleep(1.5)
    alive.stop()
    assert called == []
    assert alive.gone() is None


def test_prctl_pdeathsig_is_set_for_the_process_that_arms_the_watch(tmp_path: Path) -> None:
    script = (
        "import ctypes, signal\n"
        "from ai_service.worker import ParentWatch\n"
        "watch = ParentWatch.arm()\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "value = ctypes.c_int(0)\n"
        "assert libc.prctl(2, ctypes.byref(value), 0, 0, 0) == 0\n"  # PR_GET_PDEATHSIG
        "print(watch.pdeathsig, value.value == signal.SIGTERM)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "True"], result.stdout + result.stderr
