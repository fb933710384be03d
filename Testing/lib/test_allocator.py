"""``keep_freed_memory``: glibc keeps the network's freed activations instead of faulting them back
in on every forward pass. Each case runs in its own interpreter (the setting is process-wide)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                                reason="mallopt tuning exists on Linux with glibc only")

_FAULTS = textwrap.dedent("""
    import json, resource, sys, torch
    from VeloxSegLib import build_model
    from VeloxSegLib.infer.device import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(96, 96, 96)).eval()
    x = torch.randn(1, 2, 96, 96, 96)
    with torch.inference_mode():
        for _ in range(4):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            y = model(x)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    print(json.dumps({"applied": applied, "faults": faults, "checksum": float(y.double().sum())}))
""")


def _run(code, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "VELOXSEG_MALLOC"}
    env.pop("GLIBC_TUNABLES", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_repeated_forward_passes_stop_faulting_pages_in_and_compute_the_same_logits():
    default = _run(_FAULTS, "default")
    tuned = _run(_FAULTS, "tuned")
    assert tuned["applied"] and not default["applied"]
    # measured over 20 passes: 580-2,500 page faults per 96^3 pass by default (glibc's adaptive
    # limits settle differently from run to run), 90-110 with the setting
    assert tuned["faults"] < min(250, default["faults"]), (default, tuned)
    assert tuned["checksum"] == default["checksum"]  # an allocator setting, not a different function


@glibc_only
@pytest.mark.parametrize("env", [{"VELOXSEG_MALLOC": "default"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}])
def test_the_user_can_opt_out_or_keep_their_own_malloc_tuning(env):
    code = "from VeloxSegLib.infer.device import keep_freed_memory; import json; print(json.dumps(keep_freed_memory()))"
    assert _run(code, env_extra=env) is False
    assert _run(code) is True
