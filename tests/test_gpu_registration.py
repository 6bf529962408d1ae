"""The CUDA build of the op library, checked without a GPU: GPU kernels are
registered for every op and dtype, the static CUDA runtime is private to the
library, and the library still loads and runs on a CPU-only TensorFlow.
The kernels themselves are verified on a GPU by tests/gpu/ (no TF needed)."""
import subprocess

import pytest
import tensorflow as tf
from tensorflow.python.framework import kernels

import tf_layernorm as tfln

OPS = ["TfLayernorm>LayerNorm", "TfLayernorm>LayerNormGrad", "TfLayernorm>RMSNorm",
       "TfLayernorm>RMSNormGrad"]
# (T, U, S): the six valid dtype combinations.
VALID = {
    ("DT_FLOAT", "DT_FLOAT", "DT_FLOAT"),
    ("DT_HALF", "DT_HALF", "DT_FLOAT"),
    ("DT_HALF", "DT_FLOAT", "DT_FLOAT"),
    ("DT_BFLOAT16", "DT_BFLOAT16", "DT_FLOAT"),
    ("DT_BFLOAT16", "DT_FLOAT", "DT_FLOAT"),
    ("DT_DOUBLE", "DT_DOUBLE", "DT_DOUBLE"),
}

pytestmark = pytest.mark.skipif(not tfln.build_info()["cuda"],
                                reason="op library built without CUDA (configure.py found no "
                                       "toolkit, or TF_LAYERNORM_NEED_CUDA=0)")


def _type_combos(op, device):
    """{(T, U, S) names} of the kernels registered for op on device."""
    from tensorflow.core.framework import types_pb2
    tfln.load_ops()
    out = set()
    for k in kernels.get_registered_kernels_for_op(op).kernel:
        if k.device_type == device:
            types = {c.name: types_pb2.DataType.Name(c.allowed_values.list.type[0])
                     for c in k.constraint}
            out.add((types["T"], types["U"], types["S"]))
    return out


@pytest.mark.parametrize("op", OPS)
def test_gpu_kernel_registered_for_every_valid_dtype(op):
    gpu = _type_combos(op, "GPU")
    cpu = _type_combos(op, "CPU")
    assert VALID <= gpu, "missing GPU kernels: %s" % sorted(VALID - gpu)
    # Every other combination has an erroring kernel on GPU too, as on CPU.
    assert gpu == cpu
    assert len(gpu) == 4 * 4 * 2


def test_cuda_runtime_is_linked_statically_and_kept_private():
    lib = tfln.build_info()["library"]
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True)
    assert "libcudart" not in needed.stdout, "the op library must not need a shared libcudart"
    dyn = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True,
                         check=True).stdout
    exported = [line.split()[-1] for line in dyn.splitlines() if line.split()[-1].startswith("cuda")]
    assert not exported, "CUDA runtime symbols exported: %s" % exported[:5]


def test_cuda_build_runs_on_cpu_only_tensorflow():
    x = tf.constant([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 2.0, 2.0, 2.0]])
    with tf.device("/CPU:0"):
        y = tfln.layer_norm(x, epsilon=1e-5)
    # The MXNet documentation example (float64 NumPy reproduces it).
    expected = [[-1.41421, -0.707105, 0.0, 0.707105, 1.41421],
                [-1.2247195, -1.2247195, 0.81647956, 0.81647956, 0.81647956]]
    assert abs(y.numpy() - expected).max() < 1e-4
