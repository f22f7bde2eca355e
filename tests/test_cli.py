import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def hypergen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypergen.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_a_peft_folder_and_prints_the_hash(tmp_path, smollm_dir):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"input": "hot", "output": "cold"}\n{"input": "up", "output": "down"}\n')
    run = hypergen("generate", "--instruction", "Give the antonym.", "--demos", str(demos), "--out", str(tmp_path / "ad"))
    assert run.returncode == 0, run.stderr
    digest = run.stdout.strip()
    assert len(digest) == 64
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    assert len(load_file(tmp_path / "ad" / "adapter_model.safetensors")) == 120
    again = hypergen("generate", "--instruction", "Give  the antonym.", "--demos", str(demos), "--out", str(tmp_path / "ad2"))
    assert again.stdout.strip() == digest
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == (tmp_path / "ad2" / "adapter_model.safetensors").read_bytes()


def test_info_describes_model_and_spec(smollm_dir):
    run = hypergen("info")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["base_dims"]["num_layers"] == 30
    assert info["lora_spec"]["target_modules"] == ["q_proj", "v_proj"]
    assert info["adapter_params"] == 460800 and info["hypernetwork_params"] > 0


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"input": "a"}'], "demos.0.output"),
        (['{"input": "a", "output": "b"}', "not json"], "line 2"),
    ],
)
def test_bad_demo_files_fail_with_the_field_named(tmp_path, lines, expected):
    demos = tmp_path / "d.jsonl"
    demos.write_text("\n".join(lines))
    run = hypergen("generate", "--instruction", "x", "--demos", str(demos), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and expected in run.stderr
    assert not (tmp_path / "o").exists()


def test_empty_task_fails_before_loading_anything(tmp_path):
    run = hypergen("generate", "--instruction", "  ", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "instruction" in run.stderr
