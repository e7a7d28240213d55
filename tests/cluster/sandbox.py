"""A machine of the test's own inside this one: new PID, network and mount namespaces (root only).

Why: `ray up`/`ray down` on Ray's local provider SSH into the nodes and run `ray stop` there, which kills every Ray
process on the machine, and this machine is shared. Inside the sandbox, `ray stop` sees only the sandbox's
processes, ports are private (its own loopback), /tmp/ray and root's home (SSH sessions land there, and
~/.ray/auth_token lives there) are private folders, and every process in it dies when the sandbox's first process
exits. An sshd started inside serves the loopback addresses 127.0.0.x as the cluster's "machines".
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
SBIN = "/usr/sbin:/sbin"


def tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def unavailable_reason() -> str | None:
    """None when a sandbox can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root: it makes PID/network/mount namespaces and runs sshd"
    missing = [t for t in ("unshare", "ip", "sshd", "ssh", "ssh-keygen", "mount", "rsync") if tool(t) is None]
    if missing:
        return (f"missing {', '.join(missing)}: `apt-get install -y openssh-server openssh-client rsync iproute2 "
                f"util-linux` (make setup)")
    probe = subprocess.run([tool("unshare"), "--pid", "--fork", "--mount-proc", "--net", "--mount", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces are not allowed here: unshare said {probe.stderr.strip()!r}"
    return None


def prepare(root: Path) -> dict:
    """Keys, sshd config and a passwd whose root home is private; returns the paths the script needs."""
    # One home for the client and the nodes: ssh expands ~ in `-i ~/.ssh/...` from passwd, not from $HOME.
    home, tmp_ray = root / "home", root / "tmp-ray"
    client = home
    for folder in (home / ".ssh", tmp_ray):
        folder.mkdir(parents=True, exist_ok=True)
    key = client / ".ssh" / "id_ed25519"
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    host_key = root / "host_key"
    subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    shutil.copy(f"{key}.pub", root / "authorized_keys")
    path_line = f'export PATH="{BIN}:$PATH"\n'  # SSH sessions (bash --login -i) find this venv's ray and python
    (home / ".profile").write_text(path_line)
    (home / ".bashrc").write_text(path_line)
    (root / "sshd_config").write_text("\n".join([
        "ListenAddress 0.0.0.0", "Port 22", f"HostKey {host_key}", "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        f"PidFile {root / 'sshd.pid'}", "MaxStartups 50", "MaxSessions 50", ""]))
    passwd = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[5] = str(home)
        passwd.append(":".join(fields))
    (root / "passwd").write_text("\n".join(passwd) + "\n")
    return {"home": home, "client": client, "tmp_ray": tmp_ray}


def run_in_sandbox(command: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Runs `command` in a fresh sandbox with sshd up; its stdout ends with the sandbox's Ray processes left over
    (a line "LEFT-OVER-RAY-PROCESSES:" then one line per process)."""
    root = Path(tempfile.mkdtemp(prefix="rdpo-sbx-", dir="/tmp"))
    paths = prepare(root)
    script = f"""
set -u
ip link set lo up
mount --bind {root}/passwd /etc/passwd
mkdir -p /tmp/ray /run/sshd
mount --bind {paths['tmp_ray']} /tmp/ray
{tool('sshd')} -f {root}/sshd_config -E {root}/sshd.log
export HOME={paths['client']}
cd {cwd}
{' '.join(_quote(c) for c in command)}
rc=$?
# the [x] patterns keep Ray's own names out of this script's command line: `ray stop` matches command lines
echo LEFT-OVER-RAY-PROCESSES:
ps -eo pid,args | grep -E '[r]aylet|[g]cs_server|[d]ashboard/dashboard.py|[r]ay::'
exit $rc
"""
    try:
        # --kill-child: when unshare goes (a timeout kills it), the sandbox's first process and so all of it die
        return subprocess.run([tool("unshare"), "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--mount",
                               "bash", "-c", script], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_die_with_parent,
                              env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}:{SBIN}"})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _die_with_parent() -> None:
    """SIGKILL to unshare if the test process dies (a killed pytest runs no cleanup): with --kill-child the whole
    sandbox goes with it."""
    import ctypes
    import signal as signals
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG


def leftovers(stdout: str) -> list[str]:
    return [line for line in stdout.split("LEFT-OVER-RAY-PROCESSES:", 1)[-1].splitlines() if line.strip()]


def _quote(word: str) -> str:
    import shlex
    return shlex.quote(word)
