"""The hot-store set's logic on a fake device: bounded, never evicts a store in use, never serves a stale
version, and copies the next tenant's store while the current one computes."""

from __future__ import annotations

import pytest

from clora.trainer.hot_stores import HotStores, for_device, run_steps


class FakeDevice:
    """A copier whose copies finish when waited for; it logs starts, waits and computes in order."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def start(self, tensors):
        label = tensors["label"]
        self.log.append(f"copy {label}")
        log = self.log

        class Pending:
            def wait(self):
                log.append(f"ready {label}")
                return {"label": f"device:{label}"}

        return Pending()


def _host(tenant: str, version: int) -> dict:
    return {"label": f"{tenant}@{version}"}


def test_the_next_store_is_copied_while_the_current_one_computes_and_results_stay_hot():
    device = FakeDevice()
    hot = HotStores(2, device)

    def compute(tenant, tensors):
        device.log.append(f"compute {tenant} on {tensors['label']}")
        return {"label": f"device:{tenant}-trained"}

    steps = [("a", 0, _host("a", 0)), ("b", 0, _host("b", 0)), ("a", 1, _host("a", 1)), ("c", 0, _host("c", 0))]
    run_steps(hot, steps, compute)
    assert device.log == [
        "copy a@0", "ready a@0",  # the first step's copy is on the critical path
        "copy b@0", "compute a on device:a@0", "ready b@0",  # b's copy overlaps a's compute
        "compute b on device:b@0",  # a@1 needs no copy: a's own result stayed hot
        "copy c@0", "compute a on device:a-trained", "ready c@0",  # b (idle, oldest) made room for c
        "compute c on device:c@0",
    ]
    assert (hot.hits, hot.misses) == (3, 1) and len(hot.hot()) <= 2


def test_the_set_stays_bounded_and_never_evicts_a_store_in_use():
    hot = HotStores(2, FakeDevice())
    hot.take("a", 0, _host("a", 0))  # a computes
    assert hot.prefetch("b", 0, _host("b", 0))
    assert hot.prefetch("c", 0, _host("c", 0))  # evicts b (least recently used, idle), never a
    assert hot.hot() == {"a": 0, "c": 0} and hot.evictions == 1
    hot.take("c", 0, _host("c", 0))
    assert not hot.prefetch("d", 0, _host("d", 0))  # both in use: no room, nothing evicted
    assert hot.hot() == {"a": 0, "c": 0}
    hot.release("a")
    assert hot.prefetch("d", 0, _host("d", 0)) and hot.hot() == {"c": 0, "d": 0}


def test_a_stale_version_is_never_served():
    device = FakeDevice()
    hot = HotStores(2, device)
    hot.prefetch("a", 0, _host("a", 0))
    got = hot.take("a", 3, _host("a", 3))  # the store moved on (e.g. imported weights): copy the new one
    assert got == {"label": "device:a@3"} and (hot.hits, hot.misses) == (0, 1)
    hot.release("a")
    hot.keep("a", 4, {"label": "device:a@4"})
    assert hot.take("a", 4, _host("a", 4)) == {"label": "device:a@4"} and hot.hits == 1


def test_without_cuda_the_set_is_a_pass_through():
    import torch

    hot = for_device(torch.device("cpu"), 4)
    assert hot.capacity == 0
    assert hot.take("a", 0, _host("a", 0)) is None and not hot.prefetch("a", 0, _host("a", 0))
    with pytest.raises(ValueError, match="copier"):
        HotStores(2, None)


def test_on_the_device_the_copies_are_exact_and_a_kept_result_is_served_without_a_copy(device):
    import torch

    if device.type != "cuda":
        pytest.skip("the CPU has no hot stores (pass-through, tested above)")
    host = {"w": torch.randn(512, 64).pin_memory(), "b": torch.randn(64).pin_memory()}
    hot = for_device(device, 2)
    assert hot.prefetch("a", 0, host)
    got = hot.take("a", 0, host)  # the compute stream waits for the side stream's copy
    assert all(torch.equal(got[k].cpu(), host[k]) for k in host) and got["w"].device.type == "cuda"
    trained = {k: v * 2 for k, v in got.items()}
    hot.release("a")
    hot.keep("a", 1, trained)
    assert hot.take("a", 1, host)["w"] is trained["w"] and (hot.hits, hot.misses, hot.prefetches) == (2, 0, 1)
