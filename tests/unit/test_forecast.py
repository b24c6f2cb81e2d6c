"""The time forecast's arithmetic (plain numbers, no machine, no tensors)."""
from __future__ import annotations

import pytest

from ckptconv.plan.forecast import PROFILES, Rates, Work, forecast_seconds, pieces_written, write_seconds
from ckptconv.plan.megatron_layout import MegatronLayout

GB = 10**9
RATES = Rates(read_Bps=2 * GB, write_Bps=1 * GB, disk_write_Bps=0.25 * GB, dirty_allowance_bytes=4 * GB,
              copy_Bps=4 * GB, scan_Bps=8 * GB, hash_Bps=1 * GB, startup_s=2.0, cores=2)


def test_writes_past_the_dirty_allowance_go_at_disk_speed():
    assert write_seconds(2 * GB, RATES) == pytest.approx(2.0)
    assert write_seconds(6 * GB, RATES) == pytest.approx(4.0 + 2 * GB / (0.25 * GB))


def test_parts_add_up_from_the_profile():
    p = PROFILES[("hf_to_megatron", "megatron_torch")]
    fc = forecast_seconds(Work("hf_to_megatron", "megatron_torch", 10 * GB, 10 * GB, 1000), RATES)
    parts = fc["parts"]
    assert parts["read"] == pytest.approx(5.0)
    assert parts["write"] == pytest.approx(4.0 + 6 * 4.0)
    assert parts["cpu"] == pytest.approx(10 * p.scans_per_byte / 8 + 10 * p.hashes_per_byte / 1
                                         + 10 * p.copies_per_byte / 4)
    assert parts["pieces"] == pytest.approx(1000 * p.piece_s)
    assert parts["startup"] == pytest.approx(2.0 * (1 + p.import_ratio))
    assert fc["seconds"] == pytest.approx(sum(parts.values()))


def test_torch_dist_costs_its_import_and_workers_share_the_cpu_up_to_the_cores():
    one = forecast_seconds(Work("reshard", "megatron_torch_dist", GB, GB, 10, workers=1), RATES)["parts"]
    two = forecast_seconds(Work("reshard", "megatron_torch_dist", GB, GB, 10, workers=2), RATES)["parts"]
    four = forecast_seconds(Work("reshard", "megatron_torch_dist", GB, GB, 10, workers=4), RATES)["parts"]
    assert one["startup"] > RATES.startup_s
    assert two["cpu"] == pytest.approx(one["cpu"] / 2) and four["cpu"] == pytest.approx(two["cpu"])
    assert two["read"] == one["read"] and two["write"] == one["write"]


def test_an_unknown_command_gets_the_costliest_profile():
    w = dict(bytes_read=GB, bytes_written=GB, pieces_written=1)
    unknown = forecast_seconds(Work("something_new", "megatron_torch", **w), RATES)["seconds"]
    assert unknown >= max(forecast_seconds(Work(c, f, **w), RATES)["seconds"] for c, f in PROFILES) - 1e-9


def test_pieces_count_every_rank_file_holding_a_slice():
    lay = MegatronLayout(2, 2, 4)
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
             "decoder.layers.3.mlp.linear_fc2.weight", "decoder.final_layernorm.weight"]
    assert pieces_written(names, lay) == 2 + 2 + 2 + 2
