"""DS_TEST_SAMPLE (tests/conftest.py): the sample of parametrized cases the secondary
stacks of CI run keeps every test function and backend, its first and last case and
ceil(n / N) cases evenly spread."""

import dataclasses
import pathlib
from typing import Optional

import pytest
from conftest import _sample_every, _sampled


@dataclasses.dataclass
class _Spec:
    params: dict


@dataclasses.dataclass
class _Item:
    originalname: str
    index: int
    backend: Optional[str] = None
    parametrized: bool = True
    path: pathlib.Path = pathlib.Path("tests/test_x.py")

    @property
    def callspec(self):
        if not self.parametrized:
            raise AttributeError("callspec")
        return _Spec({"backend": self.backend} if self.backend else {"case": self.index})


def _items():
    out = [_Item("test_plain", 0, parametrized=False)]
    out += [_Item("test_matrix", i, "cpu") for i in range(10)]
    out += [_Item("test_matrix", i, "triton") for i in range(4)]
    out += [_Item("test_one", 0, "cpu")]
    out += [_Item("test_pair", i) for i in range(2)]
    return out


def _kept(kept, name, backend=None):
    return [i.index for i in kept if i.originalname == name and i.backend == backend]


def test_every_function_and_backend_keeps_its_first_last_and_a_spread_sample():
    items = _items()
    kept, dropped = _sampled(items, 3)
    assert len(kept) + len(dropped) == len(items)
    assert _kept(kept, "test_plain") == [0]
    assert _kept(kept, "test_matrix", "cpu") == [0, 3, 6, 9]  # ceil(10 / 3) = 4
    assert _kept(kept, "test_matrix", "triton") == [0, 3]  # ceil(4 / 3) = 2
    assert _kept(kept, "test_one", "cpu") == [0]
    assert _kept(kept, "test_pair") == [0]  # ceil(2 / 3) = 1
    # one in one keeps everything, in order
    assert _sampled(items, 1) == (items, [])


def test_sample_setting_is_read_and_checked(monkeypatch):
    monkeypatch.delenv("DS_TEST_SAMPLE", raising=False)
    assert _sample_every() is None
    monkeypatch.setenv("DS_TEST_SAMPLE", "4")
    assert _sample_every() == 4
    for bad in ("0", "-2", "three"):
        monkeypatch.setenv("DS_TEST_SAMPLE", bad)
        with pytest.raises(
            pytest.UsageError, match=f"DS_TEST_SAMPLE must be a positive integer, got '{bad}'"
        ):
            _sample_every()
