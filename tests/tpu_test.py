"""tpu/klora-tpu: dry runs for a single-host and a multi-host slice, flags, and shellcheck.

Nothing here needs gcloud: a fake `gcloud` on PATH records any call, and the
tests assert it was never called.
"""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "tpu", "klora-tpu")


@pytest.fixture
def env(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gcloud").write_text(f"#!/bin/sh\ntouch {tmp_path}/gcloud-called\nexit 1\n")
    (fake / "gcloud").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KLORA_TPU_")}
    clean["PATH"] = f"{fake}:{clean.get('PATH', '/usr/bin:/bin')}"
    clean["TMPDIR"] = str(tmp_path)
    yield clean
    assert not (tmp_path / "gcloud-called").exists(), "a dry run called gcloud"


def dry_run(env, *args, cwd=None):
    process = subprocess.run(["bash", SCRIPT, "--dry-run", *args], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    return [shlex.split(l) for l in lines if l and not l.startswith("#")], lines


def gcloud(commands, *words):
    """The gcloud commands that start with `gcloud compute tpus <words>`."""
    n = len(words)
    return [c for c in commands if c[:3] == ["gcloud", "compute", "tpus"] and tuple(c[3:3 + n]) == words]


def remote(command):
    (flag,) = [a for a in command if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def test_single_host_v4_8_all(env, tmp_path):
    commands, lines = dry_run(env, "all", "--", "--data", "glue/sst2", "--batch-size", "128",
                              cwd=tmp_path)
    (create,) = gcloud(commands, "tpu-vm", "create")
    assert create[5:] == ["klora-tpu", "--accelerator-type=v4-8",
                          "--version=tpu-ubuntu2204-base", "--zone=us-central2-b"]
    assert not gcloud(commands, "queued-resources", "create")
    assert not any(a.startswith("--project") for c in commands for a in c)  # gcloud's default
    scp, = gcloud(commands, "tpu-vm", "scp")[:1]
    assert "--worker=all" in scp and scp[-2:] != ["--worker=0"]
    setup, run = gcloud(commands, "tpu-vm", "ssh")[:2]
    assert "--worker=all" in setup and "--worker=all" in run
    assert "'jax[tpu]==0.10.2'" in remote(setup) and "pip install -q -e" in remote(setup)
    run_line = remote(run)
    assert "KERAS_BACKEND=jax" in run_line and "KLORA_MULTI_HOST" not in run_line
    assert run_line.endswith("recipes/sentiment.py train --distribution data --output-dir "
                             "~/klora-runs/klora-tpu --data glue/sst2 --batch-size 128")
    fetch = gcloud(commands, "tpu-vm", "scp")[1]
    assert fetch[5:9] == ["--recurse", "klora-tpu:klora-runs/klora-tpu", "tpu-runs/", "--worker=0"]
    (delete,) = gcloud(commands, "tpu-vm", "delete")
    assert "--quiet" in delete
    order = [c[3:5] for c in commands if c[0] == "gcloud" and c[1] == "compute"]
    assert order == [["tpu-vm", "create"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"],
                     ["tpu-vm", "ssh"], ["tpu-vm", "scp"], ["tpu-vm", "delete"]]
    assert any("1 host(s)" in l for l in lines)
    assert not (tmp_path / "tpu-runs").exists()  # a dry run changes nothing


def test_multi_host_v4_32_uses_queued_resources_and_multi_host_jax(env, tmp_path):
    env = {**env, "KLORA_TPU_ACCELERATOR": "v4-32", "KLORA_TPU_PROJECT": "my-project",
           "KLORA_TPU_BUCKET": "my-bucket"}
    commands, lines = dry_run(env, "--spot", "--distribution", "model", "all", cwd=tmp_path)
    assert any("4 host(s)" in l for l in lines)
    (create,) = gcloud(commands, "queued-resources", "create")
    assert create[5:] == ["klora-tpu", "--node-id=klora-tpu", "--accelerator-type=v4-32",
                          "--runtime-version=tpu-ubuntu2204-base", "--spot",
                          "--zone=us-central2-b", "--project=my-project"]
    assert gcloud(commands, "queued-resources", "describe")  # waits for ACTIVE
    assert not gcloud(commands, "tpu-vm", "create")
    for command in gcloud(commands, "tpu-vm"):
        assert "--project=my-project" in command and "--zone=us-central2-b" in command
    setup, run, copy = gcloud(commands, "tpu-vm", "ssh")
    assert "--worker=all" in setup and "--worker=all" in run and "--worker=0" in copy
    assert "KERAS_BACKEND=jax KLORA_MULTI_HOST=1 python3 recipes/sentiment.py train " \
           "--distribution model" in remote(run)
    assert remote(copy) == "gcloud storage cp -r ~/klora-runs/klora-tpu gs://my-bucket/klora-runs/"
    assert ["gcloud", "storage", "cp", "-r", "gs://my-bucket/klora-runs/klora-tpu",
            "tpu-runs/"] in commands
    (delete,) = gcloud(commands, "queued-resources", "delete")
    assert "--force" in delete and "--quiet" in delete


def test_flags_override_environment(env):
    env = {**env, "KLORA_TPU_ZONE": "europe-west4-a", "KLORA_TPU_NAME": "from-env"}
    commands, _ = dry_run(env, "create", "--accelerator", "v5litepod-8",
                          "--runtime", "v2-alpha-tpuv5-lite")
    (create,) = gcloud(commands, "tpu-vm", "create")
    assert create[5:] == ["from-env", "--accelerator-type=v5litepod-8",
                          "--version=v2-alpha-tpuv5-lite", "--zone=europe-west4-a"]
    commands, _ = dry_run(env, "--zone", "us-east5-a", "--name", "flag", "delete")
    assert commands == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "flag", "--quiet",
                         "--zone=us-east5-a"]]


@pytest.mark.parametrize("accelerator, hosts", [
    ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-8", 1), ("v5litepod-8", 1),
    ("v5litepod-16", 4), ("v6e-4", 1)])
def test_hosts_from_accelerator(env, accelerator, hosts):
    _, lines = dry_run(env, "--accelerator", accelerator, "create")
    assert f"({hosts} host(s))" in lines[0]


def test_recipe_arguments_are_quoted_for_the_remote_shell(env):
    commands, _ = dry_run(env, "run", "--", "--data", "my reviews.tsv", "--text-column", "it's")
    (run,) = gcloud(commands, "tpu-vm", "ssh")
    assert shlex.split(remote(run))[-4:] == ["--data", "my reviews.tsv", "--text-column", "it's"]


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "v9-8", "create"], "unknown accelerator"),
    (["--distribution", "pipeline", "run"], "--distribution must be"),
    (["--recipe", "nope", "run"], "no recipe"),
    (["--name", "Bad_Name", "create"], "--name must be"),
    (["--frobnicate", "create"], "unknown argument"),
])
def test_bad_arguments_fail_clearly(env, args, message):
    process = subprocess.run(["bash", SCRIPT, "--dry-run", *args], env=env,
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 2 and message in process.stderr


def test_help_lists_every_option():
    text = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True).stdout
    for word in ("--project", "--zone", "--accelerator", "--runtime", "--bucket", "--dry-run",
                 "KLORA_TPU_PROJECT", "all"):
        assert word in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    scripts = [os.path.join(ROOT, "tpu", name) for name in os.listdir(os.path.join(ROOT, "tpu"))
               if name == "klora-tpu" or name.endswith(".sh")]
    process = subprocess.run(["shellcheck", "--severity=style", *scripts],
                             capture_output=True, text=True)
    assert process.returncode == 0, process.stdout
