from rangedispatch.bench import report


def _rows():
    rows = []
    for n, (plain, off, every, rd) in {1: (100, 98, 90, 90), 4096: (300, 295, 320, 296)}.items():
        for v, us in (("torch_compile", plain), ("fusion_off", off), ("fusion_everywhere", every), ("range_dispatch", rd)):
            rows.append(dict(level="model", hidden=2048, tokens=n, fp8=False, variant=v, us=float(us), method="cudagraph"))
    rows[-1]["range"] = "[2049,16384]"
    return rows


def test_annotate_speedups_and_vs_best_static(tmp_path):
    rows = report.annotate(_rows())
    rd = [r for r in rows if r["variant"] == "range_dispatch"]
    assert rd[0]["vs_best_static"] == 1.0 and rd[0]["speedup"] == round(100 / 90, 3)
    assert rd[1]["vs_best_static"] == round(296 / 295, 3)
    report.write_csv(rows, tmp_path / "r.csv")
    back = report.read_csv(tmp_path / "r.csv")
    assert [r["us"] for r in back] == [r["us"] for r in rows]
    text = report.table(rows)
    assert "| 4096 | 300.0 (1.00x) | 295.0 (1.02x) | 320.0 (0.94x) | 296.0 (1.01x) | [2049,16384] | 1.003 |" in text
    assert report.plot(rows, tmp_path / "r.png", {2048: [2048]}) is None
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_speedups_of_every_hf_level_are_over_torch_compile():
    rows = [dict(level="hf_handwritten_sdpa_is_causal", hidden=64, tokens=8, fp8=False, variant=v, us=us,
                 method="cudagraph") for v, us in (("torch_compile", 110.0), ("range_dispatch", 100.0))]
    assert [r["speedup"] for r in report.annotate(rows)] == [1.0, 1.1]
