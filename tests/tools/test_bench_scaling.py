"""``leanops bench scaling``: the computed memory and traffic model of the distributed contrastive losses (formulas
on a hand-computed case, how they scale, Inf-CL's reference rows), its JSON and its table; no device needed."""
import json

import pytest
import torch

from leanops import cli
from leanops.benchmarks import bench_scaling as scaling

# b = 4 rows per rank, P = 2 ranks (B = 8), D = 8, bf16 (e = 2): bD = 32.
b, P, B, D, e = 4, 2, 8, 8, 2


def test_formulas_on_a_hand_computed_case():
    # bD = 32. ring, CLIP backward: 2·(bDe + 16b) = 256, 4·bD·4 = 512, 2·bDe = 128, 8b = 32.
    assert scaling.ring_clip_memory(b, D, e) == 256 + 512 + 128 + 32 == 928
    assert scaling.ring_clip_forward_memory(b, D, e) == 2 * (64 + 16) + 64 == 224
    # forward (P - 1)·(bDe + 4b) + P·4b = 80 + 32; backward (P - 1)·(bDe + 16b) + P·(4bD + 4b) = 128 + 288.
    assert scaling.ring_clip_bytes_sent(b, P, D, e) == 80 + 32 + 128 + 288 == 528
    # ring, SigLIP: no per-row statistics.
    assert scaling.ring_siglip_memory(b, D, e) == 128 + 512 + 128 == 768
    assert scaling.ring_siglip_forward_memory(b, D, e) == 128 + 16 == 144
    assert scaling.ring_siglip_bytes_sent(b, P, D, e) == 128 + 256 == 384
    # gather: B·D·(e + 4) = 384, (CLIP) 20·B = 160, 3·bD·4 = 384, 2·bDe = 128.
    assert scaling.gather_clip_memory(B, b, D, e) == 384 + 160 + 384 + 128 == 1056
    assert scaling.gather_siglip_memory(B, b, D, e) == 384 + 384 + 128 == 896
    # CLIP: forward (P-1)·b·(De + 4) + 16·(P-1)·b = 80 + 64; backward (P-1)·b·(De + 12) + (P-1)·b·(4D + 4) = 112 + 144.
    assert scaling.gather_clip_bytes_sent(b, P, D, e) == 80 + 64 + 112 + 144 == 400
    assert scaling.gather_siglip_bytes_sent(b, P, D, e) == 128 + 128 == 256
    # open_clip local: 2·BDe + 6·b·B·4 + 2·BDe = 256 + 768 + 256; traffic 4·(P - 1)·bDe.
    assert scaling.open_clip_memory(B, b, D, e) == 1280
    assert scaling.open_clip_bytes_sent(b, P, D, e) == 256
    # The dispatch: the peak is the backward's; fp32 features change e.
    assert scaling.extra_memory("clip", "ring", B, P, D, e) == (928, 224)
    assert scaling.extra_memory("siglip", "gather", B, P, D, e) == (896, None)
    assert scaling.bytes_sent("clip", "open_clip-local", B, P, D, e) == 256
    assert scaling.ring_clip_memory(b, D, 4) == 2 * (128 + 64) + 512 + 256 + 32 == 1184
    with pytest.raises(ValueError, match="unknown mode"):
        scaling.extra_memory("clip", "all-to-all", B, P, D, e)


def test_communication_bound_and_links():
    assert scaling.link(8) == "NVLink" and scaling.link(16) == "IB NDR"
    assert scaling.comm_ms_lower_bound(450 * 10**6, 8) == pytest.approx(1.0)  # 450 MB at 450 GB/s
    assert scaling.comm_ms_lower_bound(50 * 10**6, 64) == pytest.approx(1.0)  # 50 MB at 50 GB/s


def test_ring_memory_is_O_bD_and_gather_memory_grows_with_B():
    local = 4096
    ring = {P: scaling.extra_memory("clip", "ring", local * P, P, 768, 2)[0] for P in (8, 64, 1024)}
    assert len(set(ring.values())) == 1  # independent of P (and of B = b·P) at fixed b
    assert ring[8] == 24 * local * 768 + 40 * local  # bD·(2e + 16 + 2e) + 40b at e = 2
    gather = [scaling.extra_memory("clip", "gather", local * P, P, 768, 2)[0] for P in (8, 64, 1024)]
    assert gather[0] < gather[1] < gather[2]
    fixed = 3 * local * 768 * 4 + 2 * local * 768 * 2  # the (b, D) terms: independent of B
    assert gather[2] - fixed == 128 * (gather[0] - fixed)  # the rest is proportional to B
    # The ring's bytes sent grow with B too (each rank sees every block), the memory does not.
    sent = [scaling.bytes_sent("clip", "ring", local * P, P, 768, 2) for P in (8, 64)]
    assert sent[0] < sent[1]


def test_report_rows_and_inf_cl_reference():
    report = scaling.run(torch.device("cpu"))
    assert report.family == "scaling" and report.device.type == "cpu"
    sizes = scaling.valid_sizes()
    assert len(sizes) == 64 and (32768, 8) in sizes and (4 * 2**20, 1024) in sizes
    assert scaling.valid_sizes((8, 12), (8, 16)) == [(8, 8)]  # b < 1 and non-integer b are skipped
    model = [row for row in report.rows if row.check == "computed"]
    assert len(model) == len(scaling.MODES) * 64
    assert all(row.feature_dim == 768 and row.element_bytes == 2 and row.dtype == "bfloat16" for row in model)
    row = next(r for r in model if (r.loss, r.mode, r.global_batch, r.gpus) == ("clip", "ring", 131072, 8))
    assert row.local_batch == 16384 and row.extra_memory_bytes == scaling.ring_clip_memory(16384, 768, 2)
    assert row.extra_memory_gib == row.extra_memory_bytes / 2**30
    assert row.bytes_sent == row.bytes_moved == scaling.ring_clip_bytes_sent(16384, 8, 768, 2)
    assert row.link == "NVLink" and row.comm_ms_lower_bound == pytest.approx(row.bytes_sent / 450e9 * 1e3)
    assert row.ms is None  # computed, never a measured time
    inf_cl = {(r.global_batch, r.gpus): r for r in report.rows if r.mode == "inf-cl (paper)"}
    assert {key: r.extra_memory_gib for key, r in inf_cl.items()} == {(131072, 8): 0.72, (1048576, 32): 1.44}
    assert all(r.check == "reported" and r.bytes_sent is None and r.feature_dim == 768 for r in inf_cl.values())
    fp32 = scaling.run(feature_dim=512, dtype=torch.float32, global_batches=(65536,), gpus=(8,))
    assert [(r.mode, r.element_bytes, r.feature_dim) for r in fp32.rows if r.check == "computed"][0] == \
        ("ring", 4, 512)


def test_cli_writes_json_and_prints_the_table(tmp_path, capsys):
    assert cli.main(["bench", "scaling", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "scaling-cpu.json").read_text())
    assert results["family"] == "scaling" and results["settings"]["feature_dim"] == 768
    rows = results["rows"]
    assert len(rows) == len(scaling.MODES) * 64 + 2
    assert {row["backend"] for row in rows} == {"ring", "gather", "open_clip-local", "inf-cl (paper)"}
    inf_cl = [row for row in rows if row["mode"] == "inf-cl (paper)"]
    assert [(row["global_batch"], row["gpus"], row["extra_memory_gib"]) for row in inf_cl] == [
        (131072, 8, 0.72), (1048576, 32, 1.44)]
    table = capsys.readouterr().out
    assert "computed (not measured)" in table
    for title in scaling.MODE_TITLES.values():
        assert title in table
    assert "inf-cl (paper)  128k  8   16384  0.720" in table
    assert "leanops ring    128k  8   16384  0.282" in table
    assert "NVLink 450 GB/s" in table and "50 GB/s" in table


def test_needs_no_gpu_and_joins_the_families(tmp_path, capsys):
    assert "scaling" in cli.BENCHMARK_FAMILIES and "scaling" in cli.DEVICE_FREE_FAMILIES
    assert scaling.run(torch.device("cuda")).device.type == "cpu"  # device-independent: always scaling-cpu.json
    # --device cuda is accepted (and ignored) even where no GPU is visible: the model computes, it runs nothing.
    assert cli.main(["bench", "scaling", "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scaling-cpu.csv", "scaling-cpu.json"]
    assert "running scaling (computed, no device)" in capsys.readouterr().err
