"""`raydpo validate` through launcher.cli.main: output, exit codes, PAI --explain, and no heavy imports."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.recipe import load_recipe, recipe_to_dict

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = str(ROOT / "recipes" / "reference.yaml")

PAI_YAML = """\
training_strategy: dpo
learning_rate: 5e-5
num_train_epochs: 1
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
seq_length: 1024
lora_dim: 16
lora_alpha: 32
dpo_beta: 0.1
apply_chat_template: true
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
train: s3://bucket/train.jsonl
output: s3://bucket/out
name: qwen-dpo
"""


def test_reference_prints_the_resolved_recipe_and_ok(capsys):
    assert main(["validate", REFERENCE]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert yaml.safe_load(out) == recipe_to_dict(load_recipe(REFERENCE))  # stdout is the recipe, as YAML
    assert out.splitlines()[-1] == ("# recipe OK: my-dpo-run, 1 replicas, global batch 8 (8 pairs per replica per "
                                    "step), full-rank, max_length 1024, beta 0.1")


@pytest.mark.parametrize("argv", [
    [REFERENCE, "beta=0.05", "--replicas", "2", "training_config.model.peft.peft_scheme=lora"],
    [REFERENCE, "--replicas", "2", "beta=0.05", "peft_scheme=lora"],
    ["--replicas", "2", REFERENCE, "dpo_cfg.beta=0.05", "peft_scheme=lora"],
])
def test_overrides_and_replicas_in_any_order(capsys, argv):
    assert main(["validate", *argv]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["run"]["replicas"] == 2
    assert resolved["training_config"]["model"]["dpo_cfg"]["beta"] == 0.05
    assert out.splitlines()[-1] == ("# recipe OK: my-dpo-run, 2 replicas, global batch 8 (4 pairs per replica per "
                                    "step), LoRA r=16 alpha=32, max_length 1024, beta 0.05")


def test_json_overrides_then_dotted(capsys, tmp_path):
    patch = {"training_config": {"global_batch_size": 12, "model": {"dpo_cfg": {"beta": 0.2}}}}
    assert main(["validate", REFERENCE, "--overrides", json.dumps(patch), "beta=0.3", "--replicas", "3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["training_config"]["global_batch_size"] == 12
    assert resolved["training_config"]["model"]["dpo_cfg"]["beta"] == 0.3
    path = tmp_path / "patch.json"
    path.write_text(json.dumps(patch))
    assert main(["validate", REFERENCE, "--overrides", f"@{path}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["training_config"]["global_batch_size"] == 12


def test_problems_all_printed_exit_2_no_traceback(capsys):
    code = main(["validate", REFERENCE, "beta=0.9", "max_epochs=7", "losstype=ipo", "--replicas", "16"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith(f"config error: {REFERENCE}: 4 problem(s) in the recipe\n")
    assert "  - training_config.model.dpo_cfg.beta: 0.9 is not allowed; allowed: [0.001, 0.5]\n" in err
    assert "  - training_config.trainer.max_epochs: 7 is not allowed; allowed: 1..5\n" in err
    assert "  - losstype: unknown key (value 'ipo'); did you mean training_config.model.dpo_cfg.loss_type?" in err
    assert ("  - training_config.global_batch_size: global_batch_size 8 is below run.replicas=16: every replica "
            "trains at least one pair per step; use 1..8 replicas") in err


def test_missing_file_and_bad_json_exit_2(capsys, tmp_path):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file" in capsys.readouterr().err
    assert main(["validate", REFERENCE, "--overrides", "{oops"]) == 2
    assert "  - --overrides: not valid JSON; Expecting property name enclosed in double quotes at line 1 column 2" \
        in capsys.readouterr().err


def test_explain_prints_pai_translation_first(capsys, tmp_path):
    path = tmp_path / "pai.yaml"
    path.write_text(PAI_YAML)
    assert main(["validate", str(path), "--explain", "--replicas", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first_yaml = lines.index("run:")
    explanation = lines[:first_yaml]
    assert explanation[0] == "# PAI-QuickStart hyperparameters translated:"
    assert ("# pai.per_device_train_batch_size=2 × pai.gradient_accumulation_steps=4 × replicas=2 -> "
            "training_config.global_batch_size=16") in explanation
    assert "# pai.lora_dim=16 -> training_config.model.peft.lora_tuning.adapter_dim=16" in explanation
    assert yaml.safe_load(out)["training_config"]["global_batch_size"] == 16
    assert lines[-1].startswith("# recipe OK: qwen-dpo, 2 replicas, global batch 16 (8 pairs per replica per step)")


def test_explain_is_shown_even_when_the_pai_file_has_problems(capsys, tmp_path):
    path = tmp_path / "pai.yaml"
    path.write_text(PAI_YAML.replace("apply_chat_template: true", "apply_chat_template: false"))
    assert main(["validate", str(path), "--explain"]) == 2
    out, err = capsys.readouterr()
    assert "# pai.dpo_beta=0.1 -> training_config.model.dpo_cfg.beta=0.1" in out
    assert "pai.apply_chat_template: false is not supported" in err


def test_explain_on_a_nova_recipe(capsys):
    assert main(["validate", REFERENCE, "--explain"]) == 0
    assert capsys.readouterr().out.startswith("# (a Nova-shaped recipe: nothing to translate)\nrun:\n")


def test_validate_imports_no_torch_ray_or_deepspeed(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from launcher.cli import main
        rc = main(["validate", {REFERENCE!r}])
        heavy = sorted(m for m in ("torch", "ray", "deepspeed") if m in sys.modules)
        print("HEAVY=" + ",".join(heavy), "RC=" + str(rc), file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "RC=0" in proc.stderr, proc.stderr
    assert "HEAVY= " in proc.stderr, f"validate imported heavy modules: {proc.stderr}"
