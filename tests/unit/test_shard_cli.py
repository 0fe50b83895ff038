"""The stage 1 commands through typer: shard, verify, plan (exit codes, --json, messages)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hotweights.cli import offline as stage1
from support.tp_forward import build_model, reassemble, shard_cached, source_tensors

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    stage1.register(a)
    return a


def run(app, *args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_registered_in_the_main_cli():
    from hotweights.cli import app as main_app

    names = {c.name for c in main_app.registered_commands}
    assert {"shard", "verify", "plan"} <= names


def test_shard_then_verify(app, tmp_path):
    src, _ = build_model("qwen2")
    out = tmp_path / "out"
    r = run(
        app,
        "shard",
        src,
        out,
        "--tp",
        2,
        "--quantize",
        "fp8",
        "--fp8-scale",
        "tensor",
        "--max-part-size",
        "20KB",
        "--no-progress",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["tp"] == 2 and len(doc["files"]) > 2 and all((out / f).exists() for f in doc["files"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"

    r = run(app, "verify", out, "--full")
    assert r.exit_code == 0 and "ok" in r.output
    victim = out / doc["files"][-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run(app, "verify", out)
    assert r.exit_code == 0  # sizes and headers still agree
    r = run(app, "verify", out, "--full", "--json")
    assert r.exit_code == 1
    report = json.loads(r.output)
    assert report["ok"] is False and report["error"] == "ChecksumMismatch" and report["file"] == victim.name


def test_shard_plain_and_errors(app, tmp_path):
    src, _ = build_model("llama_gqa")
    r = run(app, "shard", src, tmp_path / "out", "--tp", 4, "--parts-per-rank", 2, "--progress")
    assert r.exit_code == 0, r.output
    assert "wrote 8 files" in r.output and "for tp 4" in r.output
    assert "sharding" in r.output  # the progress bar (stderr)
    assert sorted(reassemble(tmp_path / "out")) == sorted(source_tensors(src))
    r = run(app, "shard", src, tmp_path / "out", "--tp", 4)
    assert r.exit_code == 1 and "output directory is not empty" in r.output
    r = run(app, "shard", src, tmp_path / "o2", "--tp", 3)
    assert r.exit_code == 1 and "does not divide num_attention_heads" in r.output
    r = run(app, "shard", src, tmp_path / "o3", "--tp", 2, "--max-part-size", "lots")
    assert r.exit_code == 1 and "cannot read 'lots' as a size" in r.output


def test_verify_without_manifest(app, tmp_path):
    src, _ = build_model("llama_gqa")
    r = run(app, "verify", src)
    assert r.exit_code == 1 and "no hotweights.json" in r.output
    r = run(app, "verify", tmp_path / "nope")
    assert r.exit_code == 1 and "no such file or directory" in r.output


def test_plan_json(app):
    r = run(
        app,
        "plan",
        DATA / "llama-3.1-405b",
        "--tp",
        8,
        "--gpu-memory",
        "141GB",
        "--reserve",
        "5GB",
        "--kv-dtype",
        "fp16",
        "--kv-dtype",
        "fp8",
        "--kv-bits",
        4,
        "--kv-bits",
        3,
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["weights_bytes_per_gpu"] == 101_470_601_216
    assert doc["free_bytes_per_gpu"] == 141 * 10**9 - 5 * 10**9 - 101_470_601_216
    assert doc["kv_bytes_per_token"] == 2 * 126 * 1 * 128 * 2
    assert doc["kv_capacity_tokens"] == doc["free_bytes_per_gpu"] // doc["kv_bytes_per_token"]
    assert [row["kv"] for row in doc["kv_options"]] == ["fp16", "fp8", "4-bit", "3-bit"]


def test_plan_table_from_a_sharded_directory(app, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(shard_cached("mixtral", 2), d)
    r = run(app, "plan", d, "--gpu-memory", "1GB", "--reserve", "0")
    assert r.exit_code == 0, r.output
    assert "exact, from hotweights.json" in r.output and "tp 2" in r.output and "fp16" in r.output
    r = run(app, "plan", d, "--tp", 4, "--gpu-memory", "1GB")
    assert r.exit_code == 1 and "sharded for tp 2, not 4" in r.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "-1", "--workers must be at least 1"),
        ("--max-part-size", "0", "--max-part-size must be at least 1"),
    ],
)
def test_a_count_below_one_is_refused_not_taken_as_the_default(tmp_path, option, value, message):
    import subprocess
    import sys

    from support import child_env

    src, _ = build_model("qwen2")
    r = subprocess.run(
        [sys.executable, "-m", "hotweights", "shard", str(src), str(tmp_path / "out"), "--tp", "2", option, value],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
