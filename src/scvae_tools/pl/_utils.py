"""scanpy's ``show=`` / ``save=`` convention for the ``sv.pl`` functions."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import scanpy as sc
from matplotlib.figure import Figure

__all__ = ["_savefig_or_show"]


def _figure_path(name: str, save: bool | str) -> Path:
    """Where ``save`` puts the figure called ``name``, as :func:`scanpy.pl.umap` would."""
    ext = sc.settings.file_format_figs
    writekey = name
    if isinstance(save, str):
        suffix = Path(save).suffix
        # Only a suffix matplotlib can write is a format; "_v1.2" stays part of the name.
        if suffix and suffix[1:].lower() in Figure().canvas.get_supported_filetypes():
            ext = suffix[1:].lower()
            save = save[: -len(suffix)]
        writekey = name + save
    return Path(sc.settings.figdir) / f"{writekey}{sc.settings.plot_suffix}.{ext}"


def _savefig_or_show(name: str, *, show: bool | None, save: bool | str | None, fig: Figure) -> bool:
    """Save and/or show ``fig`` following scanpy's convention.

    Parameters
    ----------
    name
        The figure's base file name, e.g. ``"metrics_heatmap"``.
    show
        Show the figure with :func:`matplotlib.pyplot.show`; ``None`` means
        ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / f"{name}{plot_suffix}.{file_format_figs}"``;
        a string is appended to ``name``, and its extension, if it has one (``"_x.png"``), sets
        the format. ``None`` means ``sc.settings.autosave``; ``False`` writes nothing.
    fig
        The figure to save or show.

    Returns
    -------
    Whether the figure was shown: the plotting function returns its Axes or Figure only when it
    was not (scanpy's convention).
    """
    if save is None:
        save = sc.settings.autosave
    show = sc.settings.autoshow if show is None else bool(show)
    if not isinstance(save, bool | str):
        raise TypeError(
            f"`save` must be True, False, None or a file name suffix such as '_x.png', "
            f"got {save!r}."
        )
    if save is not False:
        path = _figure_path(name, save)
        path.parent.mkdir(parents=True, exist_ok=True)
        sc.logging.warning(f"saving figure to file {path}")
        fig.savefig(path, bbox_inches="tight")
    if show:
        plt.show()
    if show or save is not False:
        # Like scanpy: a shown or saved figure is released from pyplot; a returned Axes still
        # works (its figure can be saved again with fig.savefig).
        plt.close(fig)
    return show
