"""No secret reaches what raydpo writes or prints. Recognisable secrets are set where users keep them (AWS keys, a
session token, hub and MLflow tokens, an OpenAI key and a Ray token in the environment; a password inside
run.mlflow_tracking_uri), then `raydpo train`, `raydpo eval`, `raydpo report`, `raydpo k8s render` and
`raydpo launch`'s rendering of the ray-up YAML run, and every byte they wrote (outputs, logs, TensorBoard events,
checkpoints, manifests, the launcher's folder) and printed is searched for each secret."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.data.synthetic import answer_format_pairs
from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]
RAYDPO = str(Path(sys.executable).parent / "raydpo")
ENV_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALEAKTESTRAYDPO01",
    "AWS_SECRET_ACCESS_KEY": "leak-aws-secret-7f3a9c51",
    "AWS_SESSION_TOKEN": "leak-aws-session-5b2e8d",
    "HF_TOKEN": "hf_leakhubtoken9d4c2a",
    "MLFLOW_TRACKING_TOKEN": "leak-mlflow-token-3e8a0b",
    "MLFLOW_TRACKING_PASSWORD": "leak-mlflow-env-pw-1c6f4e",
    "OPENAI_API_KEY": "sk-leakopenai6a1d9f",
}
RAY_TOKEN = "0123456789abcdef0123456789abcdef"  # RAY_AUTH_TOKEN, for the launcher (the nodes get it as a file)
URI_PASSWORD = "leak-mlflow-uri-pw-8d2f"
# nothing listens on port 9 here: MLflow is unreachable, warned about once, with the URI in the warning
MLFLOW_URI = f"http://raydpo-user:{URI_PASSWORD}@127.0.0.1:9"
SECRETS = [*ENV_SECRETS.values(), URI_PASSWORD]


def leaks(texts: dict[str, bytes | str], secrets=SECRETS) -> list[str]:
    """'where: secret' for each secret found in each text."""
    found = []
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        found += [f"{where}: {secret}" for secret in secrets if secret.encode() in data]
    return found


def files_under(folder: Path, leave_out: set[Path] = frozenset()) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p not in leave_out}


def test_the_search_finds_a_planted_secret(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "events.bin").write_bytes(b"\x00\x01" + URI_PASSWORD.encode() + b"\xff")
    assert leaks(files_under(tmp_path)) == [f"{tmp_path}/deep/er/events.bin: {URI_PASSWORD}"]


def test_k8s_render_takes_credentials_by_reference_only(tmp_path, monkeypatch, capsys):
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "rendered.yaml"
    assert main(["k8s", "render", "recipes/reference.yaml", "run.data_s3_path=s3://bucket/dpo/train.jsonl",
                 "run.output_s3_path=s3://bucket/dpo/runs", f"run.mlflow_tracking_uri={MLFLOW_URI}",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert leaks({"rendered": out.read_bytes(), "stdout": printed.out, "stderr": printed.err}) == []
    manifests = [m for m in yaml.safe_load_all(out.read_text()) if m]
    configmap = next(m for m in manifests if m["kind"] == "ConfigMap")
    # the URI stays (the pods need the server), without its password: that comes from the Secret
    assert "http://127.0.0.1:9" in configmap["data"]["recipe.yaml"]
    job = next(m for m in manifests if m["kind"] == "RayJob")
    for group in [job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in env.values())
        assert {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"} <= set(env)


def test_launch_writes_no_secret_into_the_ray_up_yaml_or_its_logs(tmp_path, monkeypatch, capsys):
    """`raydpo launch` up to `ray up` (which fails here: no SSH): the cluster YAML it wrote, its launcher log,
    its output and the command it would run on the cluster hold no secret; the Ray token goes to a 0600 file."""
    import tempfile

    for name, value in {**ENV_SECRETS, "RAY_AUTH_TOKEN": RAY_TOKEN}.items():
        monkeypatch.setenv(name, value)
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the launcher's folder: <tmp>/raydpo/<run>/launch-*
    work = tmp_path / "work"
    work.mkdir()
    recipe = yaml.safe_load((ROOT / "recipes/reference.yaml").read_text())
    recipe["run"] |= {"mlflow_tracking_uri": MLFLOW_URI, "data_s3_path": "s3://bucket/train.jsonl",
                      "output_s3_path": "s3://bucket/runs"}
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    ran, real_run = [], subprocess.run

    def no_ssh(command, *args, **kwargs):  # every `ray` command the launcher runs: `ray up` fails, the rest pass
        if not str(command[0]).endswith("/ray"):
            return real_run(command, *args, **kwargs)
        ran.append(list(command))
        return subprocess.CompletedProcess(command, 1 if command[1] == "up" else 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", no_ssh)
    code = main(["launch", str(work / "r.yaml"), "--cluster", str(ROOT / "cluster/local.yaml"), "--working-dir",
                 str(work)])
    printed = capsys.readouterr()
    assert code == 3, printed.err  # `ray up` failed: a cluster error, and `ray down` ran
    assert [c[1] for c in ran if c[1] in ("up", "down")] == ["up", "up", "down"]
    (launch_dir,) = (scratch / "raydpo").glob("*/launch-*")
    assert (launch_dir / "cluster.yaml").is_file()
    token = home / ".ray" / "auth_token"
    assert token.read_text() == RAY_TOKEN and token.stat().st_mode & 0o777 == 0o600
    written = files_under(scratch) | {"stdout": printed.out, "stderr": printed.err,
                                      "commands": json.dumps(ran)}
    assert leaks(written, SECRETS + [RAY_TOKEN]) == []


@pytest.mark.slow
def test_train_eval_and_report_write_and_print_no_secret(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ENV_SECRETS
    data = tmp_path / "data" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in answer_format_pairs(16, seed=2)))
    out = tmp_path / "out"
    train_recipe = tmp_path / "train.yaml"
    train_recipe.write_text(yaml.safe_dump({
        "run": {"name": "leak-run", "model_name_or_path": str(tiny_model_dir), "replicas": 1,
                "data_s3_path": str(data), "output_s3_path": str(out), "mlflow_tracking_uri": MLFLOW_URI},
        "training_config": {"max_length": 128, "global_batch_size": 4, "trainer": {"max_steps": 2},
                            "checkpoint": {"every_n_steps": 1}, "data": {"validation_fraction": 0.0},
                            "model": {"peft": {"peft_scheme": "lora"}}}}))
    eval_recipe = tmp_path / "eval.yaml"
    eval_recipe.write_text(yaml.safe_dump({
        "run": {"name": "leak-eval", "model_name_or_path": str(tiny_model_dir), "data_s3_path": str(data),
                "output_s3_path": str(out / "leak-run"), "mlflow_tracking_uri": MLFLOW_URI},
        "evaluation": {"task": "preference", "max_rows": 4, "max_length": 128},
        "inference": {"batch_size": 4, "device": "cpu"}}))
    printed = {}
    for name, argv in (("train", ["train", str(train_recipe)]),
                       ("eval", ["eval", str(eval_recipe), "--model", str(out / "leak-run")]),
                       ("report", ["report", str(out / "leak-run")])):
        done = subprocess.run([RAYDPO, *argv], cwd=tmp_path, env=env, capture_output=True, timeout=1200)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:].decode(errors="replace")
        printed |= {f"{name} stdout": done.stdout, f"{name} stderr": done.stderr}
    run = out / "leak-run"
    assert (run / "eval" / "results.json").is_file() and (run / "report.html").is_file()
    assert list(run.glob("ray_train/checkpoint_*")), "no checkpoint was written"
    written = files_under(out)
    # the URI was shown, with its password as ***: in the recipe kept with the run and in the warning (in the log)
    assert b"http://raydpo-user:***@127.0.0.1:9" in (run / "recipe.yaml").read_bytes()
    assert any(b"tracking server http://raydpo-user:***@127.0.0.1:9 is unreachable" in data
               for data in written.values())
    assert leaks(written | printed) == []
