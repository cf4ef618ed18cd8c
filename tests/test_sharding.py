import numpy as np
import pytest

from actorlib import NamedSharding


def test_coords_and_sub_layouts_2x2x2():
    s = NamedSharding([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], ["dp", "pp", "tp"])
    assert s.names == ["dp", "pp", "tp"] and s.shape == {"dp": 2, "pp": 2, "tp": 2} and s.size == 8
    assert s.get_worker_coords(6) == {"dp": 1, "pp": 1, "tp": 0}
    sub = s.get_ranks(pp=1)
    assert sub.names == ["dp", "tp"] and sub.layout == [[2, 3], [6, 7]]
    assert sub.get_worker_coords(7) == {"dp": 1, "tp": 1}
    assert s.get_ranks(dp=1, pp=0, tp=1) == 5
    assert s.get_ranks_by_coord(tp=0) == [0, 2, 4, 6]
    assert s.get_axis_size("pp") == 2 and s.get_axis_index("tp") == 2
    assert s == NamedSharding(s.layout, s.names)


def test_numpy_layouts_work():
    np = pytest.importorskip("numpy")
    s = NamedSharding(np.arange(4).reshape(2, 2), ["dp", "tp"])
    assert s.get_worker_coords(2) == {"dp": 1, "tp": 0}


@pytest.mark.parametrize(
    "layout, names, match",
    [
        ([[0, 1], [1, 2]], ["dp", "tp"], "appears twice"),
        ([[0, 1], [2, 4]], ["dp", "tp"], "missing"),
        ([[0, 1], [2]], ["dp", "tp"], "ragged"),
        ([0, 1, 2], ["dp", "tp"], "1 dimensions but 2 names"),
        ([[0, 1]], ["dp", "dp"], "unique"),
        ([["a", "b"]], ["dp", "tp"], "ints"),
        ([], ["dp"], "empty"),
    ],
)
def test_bad_layouts_are_clear_value_errors(layout, names, match):
    with pytest.raises(ValueError, match=match):
        NamedSharding(layout, names)


def test_bad_queries():
    s = NamedSharding([[0, 1], [2, 3]], ["dp", "tp"])
    with pytest.raises(ValueError, match="unknown axis 'pp'"):
        s.get_ranks(pp=0)
    with pytest.raises(ValueError, match="out of range"):
        s.get_ranks(dp=2)
    with pytest.raises(TypeError, match="must be an int"):
        s.get_ranks(dp="1")
    assert s.get_ranks(dp=np.int64(1), tp=np.int32(0)) == 2  # numpy's integers are integers
    with pytest.raises(ValueError, match="rank 9"):
        s.get_worker_coords(9)
