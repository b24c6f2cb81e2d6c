"""Which listed files each worker's integrity check hashes (formats.megatron_dist_integrity)."""
from ckptconv.formats.megatron_dist_integrity import share_of_files


def test_every_file_once_the_largest_first_to_the_least_loaded(tmp_path):
    sizes = {"__0_0.distcp": 900, "__1_0.distcp": 800, "__2_0.distcp": 100, "common.pt": 50, ".metadata": 40}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    files = {n: "00" for n in sizes} | {"gone.distcp": "00"}          # a missing file: 0 bytes, still someone's
    for world in (1, 2, 3, 7):
        shares = [share_of_files(tmp_path, files, r, world) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(files)
        assert all(s[n] == "00" for s in shares for n in s)
    a, b = (set(share_of_files(tmp_path, files, r, 2)) for r in range(2))
    # 900 -> 0; 800 -> 1; 100 -> 1 (800 < 900); 50 -> 0 (900 = 900: the lower rank); 40 -> 1; 0 -> 1
    assert a == {"__0_0.distcp", "common.pt"} and b == {"__1_0.distcp", "__2_0.distcp", ".metadata", "gone.distcp"}
    assert share_of_files(tmp_path, files, 0, 1) == files
