"""CF-style, netCDF-safe Datasets: particles.conventions.encode / decode round trips (issue 19 item 3)."""

import re
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from particles import conventions

RNG = np.random.default_rng(3)
ISO_LINE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 \S+"


def simulated():
    """Shaped like particles.simulate's output (time, particle, component) with Q and weights."""
    x = RNG.normal(size=(3, 5, 2))
    return xr.Dataset(
        {"x": (("time", "particle", "component"), x / np.linalg.norm(x, axis=-1, keepdims=True)),
         "attention": (("time", "query", "key"), RNG.random((3, 5, 5))),
         "Q": (("component_out", "component"), np.eye(2))},
        coords={"time": [0.0, 0.1, 0.2], "step": ("time", [0, 1, 2])},
        attrs={"model": "krause", "normalise": 1, "beta": 1.0, "sigma": 0.5, "window": 3, "dt": 0.1,
               "krause_sync_version": "0.0.9"})


def extracted():
    """Shaped like analysis.bridge.extract's output, with a token mask and awkward attributes."""
    mask = np.ones((2, 4), bool)
    mask[1, 3] = False
    return xr.Dataset(
        {"x": (("sample", "layer", "token", "component"), RNG.normal(size=(2, 3, 4, 6))),
         "attention": (("sample", "layer", "head", "query", "key"), RNG.random((2, 3, 2, 4, 4)))},
        coords={"sample": [0, 1], "layer": [0, 1, 2], "token": np.arange(4),
                "token_mask": (("sample", "token"), mask),
                "token_str": (("sample", "token"),
                              np.array([["<s>", "a", "b", "c"], ["<s>", "d", "e", "<pad>"]], dtype=object)),
                "top_k": ("layer", np.array([None, 4, 8], dtype=object))},
        attrs={"source": "huggingface", "causal": True, "config": {"d_model": 6, "grid": [2, 2]},
               "window": None, "grid": [8, 8], "one_layer": [5], "heads": ["softmax", "krause"], "none": [],
               "flag": np.bool_(False), "n_layers": 2, "sink_k": np.int64(0)})


def read_back(path):
    if path.suffix == ".nc":
        with xr.open_dataset(path) as opened:
            return opened.load()
    return xr.open_zarr(path, consolidated=False).load()


def write_and_read(ds, path):
    if path.suffix == ".nc":
        ds.to_netcdf(path)
    else:
        ds.to_zarr(path, consolidated=False)
    return read_back(path)


@pytest.mark.parametrize("make", [simulated, extracted])
@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_round_trip_is_identical_after_decode(make, suffix, tmp_path):
    ds = make()
    encoded = conventions.encode(ds)
    back = conventions.decode(write_and_read(encoded, tmp_path / f"out{suffix}"))
    xr.testing.assert_identical(back, conventions.decode(encoded))
    # and decode(encode(ds)) is ds plus the CF metadata
    restored = conventions.decode(encoded)
    for name, var in ds.variables.items():
        assert restored[name].dtype == var.dtype or var.dtype.kind == "U"
        np.testing.assert_array_equal(restored[name].values, var.values)
        assert {k: v for k, v in restored[name].attrs.items() if k in var.attrs} == var.attrs
    for key, value in ds.attrs.items():
        got = restored.attrs[key]
        assert type(got) is type(value) or np.array_equal(got, value), key
        assert np.array_equal(got, value) if not isinstance(value, dict) else got == value


def test_encoded_files_are_cf_and_readable(tmp_path):
    ds = extracted()
    encoded = conventions.encode(ds, command="ksync extract --task digits-vit -o out.nc")
    assert encoded.attrs["Conventions"] == "CF-1.10"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 ksync extract --task digits-vit -o out.nc",
                        encoded.attrs["history"])
    assert encoded.attrs["source"] == "huggingface"  # kept: what produced the data
    assert encoded.attrs["krause_sync_version"]
    assert encoded.x.attrs["units"] == "1" and "hidden state" in encoded.x.attrs["long_name"]
    assert encoded.attention.attrs["units"] == "1" and "long_name" in encoded.layer.attrs
    assert "units" not in encoded.layer.attrs  # an index, not a quantity
    encoded.to_netcdf(tmp_path / "e.nc")
    netCDF4 = pytest.importorskip("netCDF4")
    with netCDF4.Dataset(tmp_path / "e.nc") as raw:  # what other readers see
        mask = raw["token_mask"]
        assert mask.dtype == np.int8 and mask[:].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
        assert mask.flag_meanings == "padding token" and list(mask.flag_values) == [0, 1]
        assert raw.causal == 1 and raw.config == '{"d_model": 6, "grid": [2, 2]}'
        assert raw["time" if "time" in raw.variables else "x"].units == "1"
    with xr.open_dataset(tmp_path / "e.nc") as plain:  # plain xarray restores the booleans too
        assert plain.token_mask.dtype == bool


def test_time_history_source_and_input_untouched():
    ds = simulated()
    before = ds.copy(deep=True)
    once = conventions.encode(ds)
    assert once.time.attrs == {"long_name": "time (model units)", "units": "1"}
    assert once.attrs["source"].startswith("krause-sync ")
    assert once.attrs["krause_sync_version"] == "0.0.9"  # the producer's version is kept
    assert re.fullmatch(ISO_LINE, once.attrs["history"])
    assert once.attrs["history"].endswith("test_time_history_source_and_input_untouched")
    twice = conventions.encode(conventions.decode(once), command="again")
    lines = twice.attrs["history"].split("\n")
    assert len(lines) == 2 and lines[0] == once.attrs["history"] and lines[1].endswith(" again")
    xr.testing.assert_identical(ds, before)  # encode works on a copy


def test_encode_keeps_lazy_data_lazy(tmp_path):
    dask = pytest.importorskip("dask")
    extracted().to_zarr(tmp_path / "l.zarr", consolidated=False)
    lazy = xr.open_zarr(tmp_path / "l.zarr", consolidated=False)
    assert isinstance(conventions.encode(lazy).x.data, dask.array.Array)


def test_overwritten_attributes_are_not_decoded_as_their_old_kind():
    encoded = conventions.encode(extracted())
    encoded.attrs["config"] = 3  # replaced after encoding: no longer a JSON string
    again = conventions.encode(encoded)
    assert conventions.decode(again).attrs["config"] == 3
    assert conventions.decode(again).attrs["causal"] is True


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match=r"^ds\b"):
        conventions.encode(xr.DataArray([1.0]))
    with pytest.raises(TypeError, match=r"^ds\b"):
        conventions.decode({"x": 1})
    with pytest.raises(TypeError, match=r"^command\b"):
        conventions.encode(simulated(), command=["ksync"])


def test_particles_conventions_does_not_import_analysis():
    code = ("import sys, particles.conventions; "
            "sys.exit(any(m.split('.')[0] == 'analysis' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_library_writers_write_cf_files(suffix, tmp_path):
    """particles.store.write_dataset (ksync simulate's writer) and bridge.data.save encode before writing."""
    from analysis.bridge.data import load, save
    from particles.store import write_dataset

    ds = extracted()
    for name, write in (("store", lambda p: write_dataset(ds, p, kind="extraction")),
                        ("bridge", lambda p: save(ds, p))):
        path = tmp_path / f"{name}{suffix}"
        write(path)
        back = conventions.decode(read_back(path))
        assert back.attrs["Conventions"] == "CF-1.10" and back.token_mask.dtype == bool
        assert back.attrs["config"] == ds.attrs["config"] and back.attrs["causal"] is True
    assert load(tmp_path / f"bridge{suffix}").attrs["window"] is None

