"""The time forecast's arithmetic (plain numbers, no machine, no tensors)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ckptconv.plan import forecast
from ckptconv.plan.forecast import PROFILES, Rates, Work, forecast_seconds, pieces_written, write_seconds
from ckptconv.plan.megatron_layout import MegatronLayout

GB = 10**9
RATES = Rates(read_Bps=2 * GB, write_Bps=1 * GB, disk_write_Bps=0.25 * GB, dirty_allowance_bytes=4 * GB,
              copy_Bps=4 * GB, scan_Bps=8 * GB, hash_Bps=1 * GB, startup_s=2.0, cores=2)
KEY = ("hf_to_megatron", "megatron_torch")


def test_writes_past_the_dirty_allowance_go_at_disk_speed():
    # the sample: 1 s/GB into the cache, 4 s/GB written and fsynced, so the flush alone 3 s/GB
    assert forecast.flush_Bps(RATES) == pytest.approx(GB / 3)
    assert write_seconds(2 * GB, RATES) == pytest.approx(2.0)
    assert write_seconds(6 * GB, RATES) == pytest.approx(4.0 + 2 * 3.0)
    # a disk faster than the page cache: past the allowance, writes still go at the cache's rate
    fast_disk = replace(RATES, disk_write_Bps=0.9 * GB)
    assert write_seconds(6 * GB, fast_disk) == pytest.approx(6.0)


def test_a_calibration_sample_faster_than_memory_copies_is_held_to_the_sustained_rate():
    fast = replace(RATES, write_Bps=8 * GB, disk_write_Bps=8 * GB)     # 32 MB into free pages
    assert forecast.cache_write_Bps(fast) == pytest.approx(RATES.copy_Bps / forecast.CACHE_WRITE_PASSES)
    assert write_seconds(2 * GB, fast) == pytest.approx(2 * GB / (RATES.copy_Bps / forecast.CACHE_WRITE_PASSES))
    slow = replace(RATES, write_Bps=0.5 * GB, disk_write_Bps=0.25 * GB)
    assert forecast.cache_write_Bps(slow) == pytest.approx(0.5 * GB)  # a slow sample is taken as it is


def test_serial_parts_add_up_from_the_profile():
    p = replace(PROFILES[KEY], overlapped=False)
    fc = forecast_seconds(Work(*KEY, 10 * GB, 10 * GB, 1000), RATES, profile=p)
    parts = fc["parts"]
    assert parts["read+copy"] == pytest.approx(10 / 2 + 10 * p.copies_per_byte / 4)
    assert parts["scan+hash"] == pytest.approx(10 * p.scans_per_byte / 8 + 10 * p.hashes_per_byte / 1)
    assert parts["write"] == pytest.approx(4.0 + 6 * 3.0 + 10 * p.out_hashes_per_byte / 1)
    assert parts["pieces"] == pytest.approx(1000 * p.piece_s)
    assert parts["startup"] == pytest.approx(2.0)
    assert fc["seconds"] == pytest.approx(sum(parts.values()))


def test_an_overlapped_engine_takes_its_slowest_lane_or_the_shared_cpu():
    p = replace(PROFILES[KEY], overlapped=True, scans_per_byte=1.0, hashes_per_byte=1.0, copies_per_byte=1.0,
                out_hashes_per_byte=0.0)
    serial = forecast_seconds(Work(*KEY, 2 * GB, 2 * GB, 0), RATES, profile=replace(p, overlapped=False))["parts"]
    fc = forecast_seconds(Work(*KEY, 2 * GB, 2 * GB, 0), RATES, profile=p)["parts"]
    lanes = (serial["read+copy"], serial["scan+hash"], serial["write"])
    hidden = sum(lanes) - max(lanes)
    assert fc["stream"] == pytest.approx(max(max(lanes), sum(lanes) / 2) + forecast.OVERLAP_LOSS * hidden)
    assert max(lanes) < fc["stream"] < sum(lanes)
    slow_disk = replace(RATES, dirty_allowance_bytes=0, disk_write_Bps=0.1 * GB)
    slow = forecast_seconds(Work(*KEY, 2 * GB, 2 * GB, 0), slow_disk, profile=p)["parts"]["stream"]
    assert slow == pytest.approx(18.0 + forecast.OVERLAP_LOSS * (lanes[0] + lanes[1]))   # the disk is the bound
    # (the sample's fsync alone: 1/0.1 - 1/1 = 9 s/GB)


def test_workers_share_the_cpu_up_to_the_cores():
    p = replace(PROFILES[("reshard", "megatron_torch_dist")], overlapped=False, out_hashes_per_byte=0.0)
    one, two, four = (forecast_seconds(Work("reshard", "megatron_torch_dist", GB, GB, 10, workers=w), RATES,
                                       profile=p)["parts"] for w in (1, 2, 4))
    assert one["startup"] == two["startup"] == RATES.startup_s
    assert two["scan+hash"] == pytest.approx(one["scan+hash"] / 2) and four["scan+hash"] == two["scan+hash"]
    assert two["write"] == one["write"]


def test_an_unknown_command_gets_the_costliest_profile():
    assert forecast.profile_for(Work("something_new", "megatron_torch", GB, GB, 1)) == \
        max(PROFILES.values(), key=forecast._passes)


def test_pieces_count_every_rank_file_holding_a_slice():
    lay = MegatronLayout(2, 2, 4)
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
             "decoder.layers.3.mlp.linear_fc2.weight", "decoder.final_layernorm.weight"]
    assert pieces_written(names, lay) == 2 + 2 + 2 + 2
