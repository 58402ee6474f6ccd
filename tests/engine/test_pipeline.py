"""Background reading and writing: the same items in the same order as the plain loop, errors in turn."""
import threading

import numpy as np
import pytest
import torch

from engine.pipeline import BackgroundWriter, prefetched


def _load_from(folder):
    def load(name):
        return {"thread": threading.current_thread().name,
                "tensor": torch.from_numpy(np.load(folder / f"{name}.npy"))}
    return load


def test_prefetched_gives_the_plain_loop_s_tensors_in_order(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"pair{i}" for i in range(6)]
    for name in names:
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((1, 1, 9, 10, 11)).astype(np.float32))
    load = _load_from(tmp_path)
    plain = [(n, load(n)["tensor"]) for n in names]
    background = list(prefetched(names, load))
    assert [n for n, _ in background] == names
    assert all(torch.equal(a, b["tensor"]) for (_, a), (_, b) in zip(plain, background))
    # all but the first item were read in the background thread, while the caller held the previous one
    assert {b["thread"] for _, b in background[1:]} != {threading.current_thread().name}
    assert [b["thread"] for _, b in prefetched(names, load, enabled=False)] == \
        [threading.current_thread().name] * len(names)


def test_prefetched_raises_a_load_error_at_its_turn():
    def load(i):
        if i == 2:
            raise ValueError("pair 2 is damaged")
        return i * 10
    seen = []
    with pytest.raises(ValueError, match="pair 2 is damaged"):
        for item, value in prefetched(range(5), load):
            seen.append(value)
    assert seen == [0, 10]


def test_background_writer_runs_jobs_in_order_and_reports_errors():
    done = []
    with BackgroundWriter() as writer:
        for i in range(5):
            writer.submit(done.append, i)
    assert done == list(range(5))

    def fail():
        raise OSError("disk full")
    writer = BackgroundWriter()
    writer.submit(fail)
    writer.submit(done.append, 99)               # not run after a failure
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert 99 not in done
