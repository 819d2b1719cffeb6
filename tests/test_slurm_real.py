"""The sbatch scripts under a real SLURM: one node on this machine, real sbatch, scancel and scontrol, tiny runs.

`make test-slurm` runs this file (it sets GENMODELS_REAL_SLURM=1; plain `make test` skips it). As root, Debian's
slurm-wlm and munge are installed with apt-get when missing; without them, and no way to install them, it skips
with one line. The cluster lives in a temporary folder for the length of this file: its own munged, slurmctld and
slurmd on free loopback ports, children of the test process, stopped at the end (and killed with the test process
should it die). Three settings make it fit a test:
  - AuthInfo=cred_expire=5 and sched_interval=2: a requeued job starts again after about 6 s (with SLURM's
    defaults it waits 120 s, then up to 60 s for the next pass of the scheduler);
  - the node offers what the scripts' #SBATCH lines ask for (1 GPU, 4 CPUs, 16 GB), whatever this machine has:
    SlurmdParameters=config_overrides, and a `File=` GPU gres (/dev/null; a count-only gres makes the node INVALID
    on 22.05). The jobs see CUDA_VISIBLE_DEVICES=0 and find no CUDA: they are told --device cpu;
  - MinJobAge=3600: finished jobs stay in `scontrol show job` (there is no accounting database, so no sacct).
The time-limit warning is sent with `scancel --signal=USR1 --batch` (what --signal=B:USR1@120 does, at a moment
the test chooses); one test lets a real --time=1 limit send it.
"""
from __future__ import annotations

import csv
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import EXIT_PREEMPTED, EXIT_STOPPED_AT_STARTUP
from conftest import REPO, script_env


if os.environ.get("GENMODELS_REAL_SLURM") != "1":
    pytest.skip("needs a real SLURM cluster: run `make test-slurm`", allow_module_level=True)

SLURM_PACKAGES = ["slurm-wlm", "munge"]  # slurmctld, slurmd, slurm-client (sbatch, scontrol ...) and munged
SLURM_PROGRAMS = ["slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged"]

# Tiny runs (8 steps an epoch, a second or so on one core); --log-every 1 gives a line per step to wait for.
# --device cpu: the jobs are given a GPU (CUDA_VISIBLE_DEVICES=0) that is not there, which --device auto refuses.
VAE_FLAGS = ["--dataset", "mnist", "--train-limit", "256", "--batch-size", "32", "--latent-dim", "4",
             "--log-every", "1", "--device", "cpu"]
GAN_FLAGS = ["--dataset", "mnist", "--train-limit", "256", "--batch-size", "32", "--ngf", "8", "--ndf", "8",
             "--log-every", "1", "--device", "cpu"]


# -- the cluster -------------------------------------------------------------------------------------------------
def install_slurm() -> None:
    """Make SLURM's programs available (apt-get, as root), or skip this file with one line saying why not."""
    if os.geteuid() != 0:
        pytest.skip("a test cluster needs root (slurmd starts each job as its user)", allow_module_level=True)
    if all(shutil.which(program) for program in SLURM_PROGRAMS):
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"SLURM is not installed, and installing it needs apt-get "
                    f"(apt-get install {' '.join(SLURM_PACKAGES)})",
                    allow_module_level=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"could not install SLURM: {' '.join(command)} exited {proc.returncode} ({last})",
                        allow_module_level=True)


install_slurm()  # here, not in a fixture: a module that cannot run at all is one skipped line, not one per test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=genmodels-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=3600
KillWait=10
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs=8 RealMemory=65536 Gres=gpu:1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A one-node SLURM cluster in `root`; `env` points SLURM's commands (and the jobs' scontrol) at it."""

    def __init__(self, root: Path):
        self.root, self.node = root, socket.gethostname().split(".")[0]
        self.runs = root / "runs"
        self.daemons: list[subprocess.Popen] = []
        self.env = {**script_env(), "SLURM_CONF": str(root / "slurm.conf"), "RUNS_ROOT": str(self.runs)}
        # The scripts' default PYTHON is the repository's .venv; a test run by another Python passes its own.
        if Path(sys.executable).resolve() != (REPO / ".venv" / "bin" / "python").resolve():
            self.env["PYTHON"] = sys.executable
        else:
            self.env.pop("PYTHON", None)
        for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "RUN_DIR", "MAX_RESTARTS"):
            self.env.pop(name, None)  # this test may itself run inside a SLURM job

    def start(self) -> None:
        for folder in ("state", "spool", "munge-key", "munge", "runs"):
            (self.root / folder).mkdir()
        (self.root / "munge-key").chmod(0o700)  # munged insists on a private key ...
        (self.root / "munge").chmod(0o755)      # ... and a socket that every user can reach
        key = self.root / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        munge = self.root / "munge"
        self.daemon("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
                    f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                    f"--seed-file={munge}/munged.seed")
        self.wait_for(lambda: (munge / "munge.socket").exists(), "munged's socket")
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            node=self.node, root=self.root, ctld_port=free_port(), slurmd_port=free_port()))
        (self.root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.node} Name=gpu File=/dev/null\n")
        conf = str(self.root / "slurm.conf")
        self.daemon("slurmctld", "-D", "-i", "-f", conf)
        self.daemon("slurmd", "-D", "-f", conf, "-N", self.node)
        self.wait_for(lambda: self.command("sinfo", "-h", "-o", "%T", check=False).strip() == "idle",
                      "an idle node")

    def daemon(self, *command: str) -> None:
        """Start a daemon in the foreground, as a child of this process that dies with it however it ends."""
        log = open(self.root / f"{command[0]}.stdout", "w")
        self.daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                             preexec_fn=die_with_parent))

    def wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            crashed = [p.args[0] for p in self.daemons if p.poll() is not None]
            if crashed or time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s (exited: {crashed or 'none'})\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started."""
        if any(p.args[0] == "slurmctld" and p.poll() is None for p in self.daemons):
            self.command("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 20
            while self.command("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for process in reversed(self.daemons):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def command(self, *command: str, check: bool = True, env: dict | None = None) -> str:
        proc = subprocess.run(command, capture_output=True, text=True, env=env or self.env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc.stdout + proc.stderr

    def logs(self) -> str:
        return "".join(f"--- {name} (last lines)\n" + "\n".join(
            (self.root / name).read_text(errors="replace").splitlines()[-30:]) + "\n"
            for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "slurmctld.stdout", "slurmd.stdout")
            if (self.root / name).exists())

    def sbatch(self, *args: str, env_extra: dict | None = None, array: bool = False) -> str:
        """Submit from the repository root, as a user does; the .out file goes to this cluster's runs folder."""
        output = self.runs / ("slurm-%A_%a.out" if array else "slurm-%j.out")
        proc = subprocess.run(["sbatch", "--parsable", f"--output={output}", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, env={**self.env, **(env_extra or {})}, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` as dicts (an array job: one per task)."""
        text = self.command("scontrol", "show", "job", "-o", job_id)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]

    def wait_until_done(self, job_id: str, timeout: float = 120) -> list[dict]:
        """Wait until the job (every task of an array) has ended for good; return its records."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if all(job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still not done after {timeout} s: {jobs}\n"
                                     f"{self.out_text(job_id)}\n{self.logs()}")
            time.sleep(0.5)

    def out_file(self, job_id: str) -> Path:
        return self.runs / f"slurm-{job_id}.out"

    def out_text(self, job_id: str) -> str:
        path = self.out_file(job_id)
        return path.read_text(errors="replace") if path.exists() else f"(no {path.name})"

    def wait_for_output(self, job_id: str, text: str, timeout: float = 90, after: int = 0) -> str:
        """Wait until `text` appears in the job's .out file (after its first `after` characters)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.out_text(job_id)
            if text in out[after:]:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared in {self.out_file(job_id).name} "
                                     f"({self.jobs(job_id)}):\n{out}\n{self.logs()}")
            time.sleep(0.2)


def die_with_parent() -> None:
    """In a daemon's child process before exec: the kernel sends it SIGTERM when the test process dies, even by
    SIGKILL or a CI timeout, so no daemon outlives the test (prctl PR_SET_PDEATHSIG, Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- what a run left behind -------------------------------------------------------------------------------------
def model_tensors(run_dir: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the exported TorchScript models, by file and name."""
    return {f"{name}:{key}": value for name in files
            for key, value in torch.jit.load(str(run_dir / name), map_location="cpu").state_dict().items()}


def loss_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-clock columns (those differ between any two runs)."""
    with open(run_dir / "metrics.csv") as f:
        return [{key: value for key, value in row.items() if not key.endswith("time_s")} for row in csv.DictReader(f)]


def assert_same_run(run_dir: Path, reference: Path, files: list[str]) -> None:
    """Bit for bit: the same exported weights and the same losses, epoch by epoch, each epoch once."""
    assert loss_rows(run_dir) == loss_rows(reference)
    ours, theirs = model_tensors(run_dir, files), model_tensors(reference, files)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{run_dir.name}: {key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def vae_reference(cluster, mnist_dir):
    """The uninterrupted run the interrupted SLURM jobs must equal: plain `python vae_train.py`, same flags."""
    flags = [*VAE_FLAGS, "--data-dir", mnist_dir, "--epochs", "6"]
    run_dir = cluster.root / "reference-vae"
    proc = subprocess.run([sys.executable, str(REPO / "vae_train.py"), *map(str, flags), "--run-dir", run_dir],
                          capture_output=True, text=True, env=cluster.env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return flags, run_dir


def continue_command(out: str) -> list[str]:
    """The sbatch command launch.sh prints when a run stops without a requeue."""
    lines = [line for line in out.splitlines() if "to continue the run in a new job:" in line]
    assert lines, f"no continue command in the output:\n{out}"
    return shlex.split(lines[-1].split("to continue the run in a new job:", 1)[1])


# -- the scenarios ---------------------------------------------------------------------------------------------
def test_time_limit_warning_checkpoints_requeues_and_resumes_bit_for_bit(cluster, vae_reference):
    flags, reference = vae_reference
    job = cluster.sbatch("slurm/vae.sh", *flags)
    cluster.wait_for_output(job, "epoch 1/6 step 2/")
    cluster.command("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 sends
    [record] = cluster.wait_until_done(job)
    out = cluster.out_text(job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", out
    assert f"exited with {EXIT_PREEMPTED}" in out and f"requeueing job {job}" in out
    run_dir = cluster.runs / f"slurm-{job}"
    assert f"restart 1 run {run_dir} (checkpoint at start: step-" in out
    assert_same_run(run_dir, reference, ["VAE_model.pth"])


def test_scancel_stops_without_requeue_and_the_printed_command_continues_bit_for_bit(cluster, vae_reference):
    flags, reference = vae_reference
    job = cluster.sbatch("slurm/vae.sh", *flags)
    cluster.wait_for_output(job, "epoch 1/6 step 2/")
    cluster.command("scancel", job)
    out = cluster.wait_for_output(job, "to continue the run in a new job:")
    [record] = cluster.wait_until_done(job)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", out
    assert f"exited with {EXIT_PREEMPTED}" in out and "requeueing" not in out
    run_dir = cluster.runs / f"slurm-{job}"

    command = continue_command(out)
    assert command[:4] == ["sbatch", "slurm/vae.sh", "--resume", str(run_dir)], command
    job2 = cluster.sbatch(*command[1:])
    [record2] = cluster.wait_until_done(job2)
    out2 = cluster.out_text(job2)
    assert record2["JobState"] == "COMPLETED", out2
    assert f"job {job2} restart 0 run {run_dir} (checkpoint at start: step-" in out2
    assert not (cluster.runs / f"slurm-{job2}").exists(), "the new job must continue the old folder"
    assert_same_run(run_dir, reference, ["VAE_model.pth"])


def test_outside_requeue_resumes_the_gan_bit_for_bit(cluster, mnist_dir):
    flags = [*GAN_FLAGS, "--data-dir", mnist_dir, "--epochs", "8"]
    reference = cluster.root / "reference-dcgan"
    proc = subprocess.run([sys.executable, str(REPO / "dcgan_train.py"), *map(str, flags), "--run-dir", reference],
                          capture_output=True, text=True, env=cluster.env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    job = cluster.sbatch("slurm/dcgan.sh", *flags)
    cluster.wait_for_output(job, "epoch 1/8 step 2/")
    cluster.command("scontrol", "requeue", job)  # an admin, or a pre-emption with PreemptMode=REQUEUE
    [record] = cluster.wait_until_done(job)
    out = cluster.out_text(job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", out
    assert "stopped by SIGTERM" in out and f"exited with {EXIT_PREEMPTED}" in out
    assert f"SLURM is requeueing job {job}" in out and "to continue the run in a new job" not in out, out
    assert "[launch] requeueing" not in out, "SLURM requeued this job itself; launch.sh must not requeue it again"
    assert_same_run(cluster.runs / f"slurm-{job}", reference, ["DCGAN_model_G.pth", "DCGAN_model_D.pth"])


def test_warning_during_start_up_requeues_instead_of_giving_up(cluster, mnist_dir):
    """Python is still importing torch when the warning comes: exit 76, requeued, and the next start finishes."""
    job = cluster.sbatch("slurm/vae.sh", *VAE_FLAGS, "--data-dir", mnist_dir, "--epochs", "1")
    cluster.wait_for_output(job, f"[launch] job {job} restart 0")
    time.sleep(0.5)  # Python has started (its handlers come first), and needs seconds before its first step
    cluster.command("scancel", "--signal=USR1", "--batch", job)
    [record] = cluster.wait_until_done(job)
    out = cluster.out_text(job)
    assert f"exited with {EXIT_STOPPED_AT_STARTUP}" in out and "no progress" not in out, out
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", out
    assert (cluster.runs / f"slurm-{job}" / "VAE_model.pth").exists()


def test_array_tasks_train_their_line_of_the_table_in_their_own_folders(cluster, mnist_dir):
    betas = cluster.root / "betas.txt"
    betas.write_text("# two betas\n0.5\n\n2\n")
    env = {"BETAS_FILE": str(betas)}
    array = cluster.sbatch("--array=0-1", "slurm/vae_betas.sh", *VAE_FLAGS, "--data-dir", mnist_dir,
                           "--epochs", "1", env_extra=env, array=True)
    # A range that does not fit the table: every task stops with exit 2 and says which range fits.
    wrong = cluster.sbatch("--array=0-2", "slurm/vae_betas.sh", env_extra=env, array=True)
    for record in cluster.wait_until_done(wrong):
        assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", record
    assert f"submit with: BETAS_FILE={betas} sbatch --array=0-1 slurm/vae_betas.sh" in cluster.out_text(f"{wrong}_2")

    records = cluster.wait_until_done(array)
    assert [record["JobState"] for record in records] == ["COMPLETED", "COMPLETED"], cluster.out_text(f"{array}_0")
    for task, beta, name in ((0, 0.5, "vae-beta0.5"), (1, 2.0, "vae-beta2")):
        args = json.loads((cluster.runs / f"slurm-{array}_{task}" / "config.json").read_text())["args"]
        assert (args["beta"], args["name"], args["sweep"]) == (beta, name, "vae-betas")


def test_a_real_time_limit_sends_the_warning_and_the_job_requeues_itself(cluster, mnist_dir):
    """--time=1 --signal=B:USR1@15: SLURM checks limits every 30 s, so the warning comes 15-45 s before the end."""
    job = cluster.sbatch("--time=1", "--signal=B:USR1@15", "slurm/vae.sh", *VAE_FLAGS, "--data-dir", mnist_dir,
                         "--epochs", "1000")
    run_dir = cluster.runs / f"slurm-{job}"
    out = cluster.wait_for_output(job, f"restart 1 run {run_dir} (checkpoint at start: step-", timeout=150)
    cluster.command("scancel", job)
    cluster.wait_for_output(job, "to continue the run in a new job:")
    assert "stopped by SIGUSR1" in out and f"requeueing job {job}" in out, out
