"""notebooks/quickstart.ipynb runs end to end on CPU (create, convert, predict, maps, fine-tune)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO

nbclient = pytest.importorskip("nbclient", reason="needs nbclient, nbformat and ipykernel")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def outputs_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_quickstart_notebook_executes(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CA_FLAX_PTH", raising=False)
    monkeypatch.setenv("CA_FLAX_QUICKSTART_DIR", str(tmp_path / "work"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        # The kernel starts in the repo root, as the notebook asks: the installed (here: the
        # checkout's) ca_flax, and configs/ for the fine-tune cell, with no sys.path edits.
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()
    nbformat.write(nb, tmp_path / "executed.ipynb")  # kept by pytest for inspection
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "\n".join(outputs_text(c) for c in code)
    assert "converted random_mbv2_ca.pth" in text
    assert "blocks with CA: features_2," in text
    assert "after 6 steps: eval top-1" in text
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the attention-map figure was not displayed"
    assert (tmp_path / "work" / "finetune").is_dir()
