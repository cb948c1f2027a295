"""Dispatch on a CPU without some features, simulated with PYQKERN_DISABLE_FEATURES
(the detection result is masked before the variants are chosen)."""
import json
import os
import subprocess
import sys


import pyqkern as pq

CODE = """
import json, numpy as np, pyqkern as pq
out = {"variants": pq.variants(), "info_active": pq.info()["active_variant"]}
w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
try:
    qt = pq.quantize(w, "q4_0")
    out["bytes"] = qt.data.tobytes().hex()
    out["y"] = pq.matmul(w, qt).tobytes().hex()
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def run(env_extra):
    # the child must import the same (built) pyqkern as this process, not a source checkout in cwd
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pq.__file__)))
    env = dict(os.environ, PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYQKERN_ISA", None)
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=120,
                       cwd=pkg_parent)
    assert r.returncode == 0, r.stderr  # an error, never a crash (SIGILL would show here)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_masked_features_pick_a_lower_variant_with_identical_results():
    full = run({})
    no512 = run({"PYQKERN_DISABLE_FEATURES": "avx512f"})
    assert "avx512" not in no512["variants"] and "avx512vnni" not in no512["variants"]
    # AVX-VNNI (256-bit) is what Alder Lake-class CPUs have instead of AVX-512
    assert no512["info_active"] == ("avxvnni" if "avxvnni" in full["variants"] else
                                    "avx2" if "avx2" in full["variants"] else "ref")
    no_vnni = run({"PYQKERN_DISABLE_FEATURES": "avx512f,avxvnni"})
    assert "avxvnni" not in no_vnni["variants"]
    assert no_vnni["info_active"] == ("avx2" if "avx2" in full["variants"] else "ref")
    assert no_vnni["bytes"] == full["bytes"] and no_vnni["y"] == full["y"]
    scalar = run({"PYQKERN_DISABLE_FEATURES": "avx2,avx512f"})
    assert scalar["variants"] == ["ref"] and scalar["info_active"] == "ref"
    assert full["bytes"] == no512["bytes"] == scalar["bytes"]
    assert full["y"] == no512["y"] == scalar["y"]  # int8 compute: bit-identical everywhere


def test_forcing_a_variant_the_cpu_cannot_run_is_a_clear_error():
    out = run({"PYQKERN_DISABLE_FEATURES": "avx512vnni", "PYQKERN_ISA": "avx512vnni"})
    assert "cannot run" in out["error"] and out["error"].startswith("RuntimeError")
    assert out["info_active"].startswith("error:")
