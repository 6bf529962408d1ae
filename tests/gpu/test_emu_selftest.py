"""The SIMT emulator (tests/gpu/emu) catches the bugs it claims to catch.

tests/gpu/emu/selftest_kernels.cu holds small kernels, each correct or with
one planted bug. Here they run on the emulator under its three schedules:
the correct ones must give the same bits under all of them; each broken one
must be caught, by the check that exists for it (the fault message says
which), by a result that changes with the schedule (races), or by NaN from
the 0xFF poison in __shared__ memory (reads of slots nobody wrote).
The out-of-bounds write is left to AddressSanitizer: test_emu_sanitized.py.

Runs on any machine with g++ and binutils; a few seconds (one small build,
cached in build/emu/ by source hash).
"""
import ctypes
import os
import shutil
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "emu", "selftest_kernels.cu")
sys.path.insert(0, os.path.join(HERE, "emu"))
import build as emu_build  # noqa: E402  (tests/gpu/emu/build.py)

SCHEDULES = {"in-order": 0, "reversed": 1, "random": 2}
LAUNCH_FAILURE = 719          # cudaErrorLaunchFailure
INVALID_CONFIGURATION = 9     # cudaErrorInvalidConfiguration
THREADS = 256                 # the reduction kernels' block (8 warps)
BLOCKS = 13


def build_selftest(sanitize=False):
    return emu_build.build_library([SOURCE], name="emu_selftest", sanitize=sanitize)


def source_line(tag):
    """`file:line` of the selftest_kernels.cu line tagged `line:<tag>`, as
    faults quote it (the build names the file relative to the repository)."""
    with open(SOURCE) as f:
        hits = [i for i, text in enumerate(f, 1) if text.rstrip().endswith("line:" + tag)]
    assert len(hits) == 1, tag
    return "%s:%d" % (os.path.relpath(SOURCE, emu_build.ROOT), hits[0])


class SelfTest:
    """ctypes over the st_* entry points; arrays are numpy (float32 / int32)."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.tfln_emu_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int,
                                                ctypes.c_int]
        self.lib.tfln_emu_take_fault.restype = ctypes.c_char_p
        self.lib.tfln_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_longlong)] * 3
        self.lib.st_launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong,
                                       ctypes.c_void_p]

    def configure(self, schedule="in-order", seed=1):
        self.lib.tfln_emu_configure(SCHEDULES[schedule], seed, 132, 0)
        # The random schedule is seeded by (seed, launches since the counters'
        # reset): resetting here makes a test's schedules independent of the
        # tests that ran before it.
        self.lib.tfln_emu_reset_counters()

    def take_fault(self):
        return self.lib.tfln_emu_take_fault().decode()

    def blocks_run(self):
        vals = [ctypes.c_longlong() for _ in range(3)]
        self.lib.tfln_emu_counters(*[ctypes.byref(v) for v in vals])
        return vals[1].value

    def call(self, name, *args):
        """Runs st_<name>; returns (cudaError_t of the launch, fault text)."""
        conv = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else a for a in args]
        status = getattr(self.lib, "st_" + name)(*conv)
        return status, self.take_fault()


@pytest.fixture(scope="module")
def st():
    for tool in ("g++", "objcopy", "readelf", "c++filt"):
        if shutil.which(tool) is None:
            # As the emulated grid: never pass by skipping where the op builds.
            pytest.fail("%s not found (the emulated build needs binutils and g++)" % tool)
    return SelfTest(build_selftest())


@pytest.fixture(autouse=True)
def in_order_afterwards(st):
    yield
    st.configure()
    st.take_fault()


def inputs(n, seed=0):
    # Magnitudes over several octaves: a different summation order would
    # round differently, so equal bits mean the same order.
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))).astype(np.float32)


def schedules():
    """Every schedule; random with a few seeds."""
    return [("in-order", 1), ("reversed", 1)] + [("random", s) for s in (1, 2, 3)]


def run_sums(st, name, x, blocks, threads, outputs_per_block=1, schedule="in-order", seed=1):
    st.configure(schedule, seed)
    out = np.full(blocks * outputs_per_block, np.nan, np.float32)
    status, fault = st.call(name, x, out, blocks, threads)
    assert (status, fault) == (0, ""), (name, schedule, status, fault)
    return out


def block_sums(st, x, threads):
    return run_sums(st, "block_sum", x, x.size // threads, threads)


# --- correct kernels ----------------------------------------------------------

@pytest.mark.parametrize("threads", [THREADS, 160, 32])
def test_block_sum_same_bits_under_every_schedule(st, threads):
    x = inputs(BLOCKS * threads)
    runs = {(sched, seed): run_sums(st, "block_sum", x, BLOCKS, threads, schedule=sched,
                                   seed=seed)
            for sched, seed in schedules()}
    ref = x.astype(np.float64).reshape(BLOCKS, threads).sum(axis=1)
    first = runs[("in-order", 1)]
    np.testing.assert_allclose(first, ref, rtol=1e-5)
    for key, out in runs.items():
        assert out.tobytes() == first.tobytes(), key


def test_two_sums_with_barrier_same_bits_under_every_schedule(st):
    x = inputs(BLOCKS * 2 * THREADS, seed=1)
    # Each sum is BlockSum over one half: the same tree, so the same bits.
    halves = x.reshape(BLOCKS, 2, THREADS)
    expect = np.stack([block_sums(st, np.ascontiguousarray(halves[:, h]), THREADS)
                       for h in (0, 1)], axis=1).reshape(-1)
    for sched, seed in schedules():
        out = run_sums(st, "two_sums", x, BLOCKS, THREADS, 2, sched, seed)
        assert out.tobytes() == expect.tobytes(), (sched, seed)


# --- shared-memory bugs: results, not faults ------------------------------------

def test_reuse_race_changes_the_result_under_some_schedule(st):
    # Warp 0 reads the first sum's partials while, with no barrier between,
    # the other warps may already write the second sum's into the same slots.
    # Under the in-order and reversed schedules warp 0 happens to read first;
    # the random one runs whole warps in random order and exposes the race.
    x = inputs(BLOCKS * 2 * THREADS, seed=2)
    correct = run_sums(st, "two_sums", x, BLOCKS, THREADS, 2)
    differs = [sched for sched, seed in schedules()
               if run_sums(st, "two_sums_reuse_race", x, BLOCKS, THREADS, 2, sched,
                          seed).tobytes() != correct.tobytes()]
    assert differs, "a write-after-read race on __shared__ partials went unnoticed"


def test_missing_barrier_reads_the_poison(st):
    # No barrier between the warps' partial writes and warp 0's reads: the
    # in-order schedule runs warp 0 ahead and it reads slots still holding
    # the 0xFF poison (NaN); the reversed one happens to hide the bug.
    x = inputs(BLOCKS * THREADS, seed=3)
    correct = block_sums(st, x, THREADS)
    outs = {(sched, seed): run_sums(st, "missing_barrier", x, BLOCKS, THREADS, schedule=sched,
                                   seed=seed)
            for sched, seed in schedules()}
    assert any(o.tobytes() != correct.tobytes() for o in outs.values())
    assert np.isnan(outs[("in-order", 1)]).all(), outs[("in-order", 1)]


def test_read_of_a_slot_nobody_wrote_is_nan(st):
    # 5 warps write 5 partials; warp 0 reads 8. Without the poison the 3
    # stale slots would hold zeros and the sums would come out right.
    x = inputs(BLOCKS * 160, seed=4)
    for sched, seed in schedules():
        out = run_sums(st, "unwritten_slot", x, BLOCKS, 160, schedule=sched, seed=seed)
        assert np.isnan(out).all(), (sched, out)


# --- contract violations: the launch fails with the check's message ---------------

def _every(*fragments):
    return {s: [list(fragments)] for s in SCHEDULES}


def _by_schedule(in_order, reversed_, random=None):
    """When the schedule decides which check fires first: in order and
    reversed are deterministic; random may give either."""
    return {"in-order": [in_order], "reversed": [reversed_],
            "random": random or [in_order, reversed_]}


def _exit_vs_barrier(tag, waiting, exited):
    """A barrier that some threads skip or leave the kernel before: in order,
    a skipping thread exits while the others wait; reversed, the skippers are
    gone before the first thread reaches the barrier."""
    at = source_line(tag)
    return _by_schedule(
        ["exited while %d threads wait at __syncthreads at %s" % (waiting, at),
         "(a barrier some threads never reach)"],
        ["__syncthreads at %s after %d threads of the block exited" % (at, exited)],
        random=[["exited while", "threads wait at __syncthreads at " + at],
                ["__syncthreads at %s after" % at, "threads of the block exited"]])


def _out_only(out):
    return (out,)


def fault_cases():
    """name -> (its arguments given a 64-float output, {schedule: alternatives});
    the fault must contain every fragment of one alternative."""
    return {
        "mask_excludes_caller": (_out_only, _every(
            "thread (0,0,0)", "with mask 0xfffffffe that excludes the calling lane 0")),
        # In order, lane 16 exits while lanes 0-15 wait at the shuffle; reversed,
        # lanes 16-31 are gone before lane 15 calls it.
        "mask_names_exited_lane": (_out_only, _by_schedule(
            ["exited while lanes of its warp wait for it at a shuffle"],
            ["with mask 0xffffffff naming lane 16, which has exited"],
            random=[["exited while lanes of its warp wait for it at a shuffle"],
                    ["with mask 0xffffffff naming lane", "which has exited"]])),
        "divergent_shuffles": (_out_only, _every(
            "lanes of mask 0xffffffff meet at different warp operations",
            source_line("shfl_low"), source_line("shfl_high"))),
        "read_outside_mask": (_out_only, _every(
            "lane 0 reads lane 16, outside the mask 0x0000ffff", source_line("outside_mask"))),
        "mask_names_absent_lanes": (_out_only, _every(
            "with mask 0xffffffff naming lanes absent from this 16-lane warp")),
        "barrier_inside_lane_branch": (_out_only, _by_schedule(
            ["naming lane 0, which waits at __syncthreads at " + source_line("lane0_barrier")],
            ["__syncthreads at %s while lanes of its warp wait for it at a shuffle"
             % source_line("lane0_barrier")])),
        # In order, the lower half's shuffle completes before the upper half
        # waits at __syncwarp, and exits while it waits; reversed, the upper
        # half waits first and the lower half's mask overlaps its group.
        "overlapping_masks": (_out_only, _by_schedule(
            ["exited while lanes of its warp wait for it at __syncwarp at "
             + source_line("full_syncwarp")],
            ["shuffle at %s with mask 0x0000ffff while lanes wait at another one at %s with "
             "mask 0xffffffff" % (source_line("half_shfl"), source_line("full_syncwarp"))])),
        "bad_width": (_out_only, _every("with width 12 (a power of two <= 32 expected)")),
        "divergent_barrier": (_out_only, _exit_vs_barrier("divergent", 32, 32)),
        "barrier_after_exit": (lambda out: (np.zeros(64, np.float32), out, 40),
                               _exit_vs_barrier("after_exit", 40, 24)),
        "barriers_on_two_lines": (_out_only, _every(
            "(divergent barriers)", source_line("barrier_low"), source_line("barrier_high"))),
    }


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(fault_cases()))
def test_contract_violation_fails_the_launch(st, name, schedule):
    args, expected = fault_cases()[name]
    st.configure(schedule, seed=7)
    status, fault = st.call(name, *args(np.zeros(64, np.float32)))
    assert status == LAUNCH_FAILURE, (status, fault)
    assert any(all(frag in fault for frag in alt) for alt in expected[schedule]), fault
    assert st.take_fault() == "", "reading the fault clears it"
    # Fibers abandoned mid-block must not disturb the next launch.
    x = inputs(2 * THREADS, seed=5)
    np.testing.assert_allclose(block_sums(st, x, THREADS),
                               x.astype(np.float64).reshape(2, THREADS).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("grid,block,smem", [
    (1, 2048, 0),   # more threads than a block may have
    (0, 32, 0),     # an empty grid
    (1, 0, 0),      # an empty block
    (1, 32, 16),    # dynamic shared memory, which the emulator refuses to fake
])
def test_invalid_launch_is_refused_and_runs_nothing(st, grid, block, smem):
    ran = np.zeros(1, np.int32)
    before = st.blocks_run()
    status, fault = st.call("launch", grid, block, smem, ran)
    assert (status, fault) == (INVALID_CONFIGURATION, "")
    assert ran[0] == 0 and st.blocks_run() == before
    # The error was consumed by the launch's cudaGetLastError: the next is clean.
    status, fault = st.call("launch", 2, 1024, 0, ran)
    assert (status, fault, ran[0], st.blocks_run()) == (0, "", 1, before + 2)


def test_tail_overrun_is_invisible_without_a_sanitizer(st):
    # The emulator does not bounds-check memory: the off-by-one runs and writes
    # one element past n (into slack here). test_emu_sanitized.py shows that
    # AddressSanitizer on the sanitized build reports the same write.
    n = 1000
    out = np.full(n + 1, np.nan, np.float32)
    assert st.call("tail_off_by_one", out, n) == (0, "")
    assert out[n] == n
