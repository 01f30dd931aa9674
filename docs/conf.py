"""Sphinx configuration of the scvae-tools documentation.

Build (offline, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The build needs no network: there is no intersphinx and nothing is downloaded. The tutorial is
executed on scanpy's bundled ``pbmc68k_reduced``. Reading needs none either: MathJax 3 (from
the sphinx-mathjax-offline package) is copied into ``_build/html/_static/mathjax`` and loaded
from there, so formulas render in a browser without a network.
"""

from __future__ import annotations

import re
from datetime import date
from importlib.metadata import version as _version

project = "scvae-tools"
author = "scvae-tools developers"
copyright = f"{date.today().year}, {author}"
release = _version("scvae-tools")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.mathjax",
    # Serves MathJax from _static instead of a CDN (sets mathjax_path, copies the files).
    "sphinx-mathjax-offline",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# -- MyST and notebook execution ------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Executed on every build, so the tutorial always runs against the current code.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_merge_streams = True
nb_execution_show_tb = True

# -- API reference --------------------------------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "bysource"
# The page's table of contents lists "encode()", not "LatentModel.encode()".
toc_object_entries_show_parents = "hide"
autodoc_default_options = {"members": True}
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # dataclass "Attributes" sections: no duplicate attribute entries
# sphinx-autodoc-typehints: types from the signatures, defaults shown in the parameter list.
typehints_defaults = "comma"
always_document_param_types = False
typehints_use_signature = False
typehints_use_signature_return = False

# -- Cross references -----------------------------------------------------------------------------
# Every reference must resolve (-W makes a dangling one an error). The build is offline, so there
# is no intersphinx: references to other projects' objects cannot resolve and are listed here,
# one by one. Our own objects are never listed.
nitpicky = True
nitpick_ignore = [
    # anndata: the data container every tool takes.
    ("py:class", "anndata.AnnData"),
    # torch: the dtype of the likelihoods' and layers' computations.
    ("py:class", "torch.dtype"),
    ("py:class", "AnnData"),
    # numpy / pandas / scipy: returned arrays and tables.
    ("py:class", "numpy.ndarray"),
    ("py:class", "np.ndarray"),
    ("py:class", "pandas.DataFrame"),
    ("py:class", "pandas.core.frame.DataFrame"),  # where DataFrame is defined
    ("py:class", "pandas.Categorical"),
    ("py:class", "scipy.sparse.csr_matrix"),
    # matplotlib: what the plotting functions return or draw into.
    ("py:class", "matplotlib.axes.Axes"),
    ("py:class", "matplotlib.axes._axes.Axes"),  # where Axes is defined
    ("py:class", "matplotlib.figure.Figure"),
    ("py:class", "matplotlib.colors.Colormap"),
    # scanpy: the functions our preprocessing and datasets follow or call.
    ("py:func", "scanpy.datasets.pbmc3k"),
    ("py:func", "scanpy.pp.calculate_qc_metrics"),
    ("py:func", "scanpy.pp.highly_variable_genes"),
    ("py:func", "scanpy.pp.log1p"),
    ("py:func", "scanpy.pp.neighbors"),
    ("py:func", "scanpy.read_10x_mtx"),
    ("py:func", "scanpy.tl.rank_genes_groups"),
    ("py:func", "scanpy.get.rank_genes_groups_df"),
    # scikit-learn: the neighbour search that label transfer uses.
    ("py:class", "sklearn.neighbors.NearestNeighbors"),
    ("py:meth", "anndata.AnnData.var_names_make_unique"),
    # torch: the models are torch modules working on tensors.
    ("py:class", "torch.Tensor"),
    ("py:class", "torch.device"),
    ("py:class", "torch.Generator"),
    ("py:class", "torch.nn.Module"),
    ("py:class", "torch.nn.Sequential"),
    ("py:class", "torch.nn.modules.module.Module"),
    ("py:class", "torch.nn.modules.container.Sequential"),
    ("py:class", "torch.nn.parameter.Parameter"),
    ("py:class", "anndata._core.anndata.AnnData"),  # where AnnData is defined
    # the standard library's typing names, as sphinx-autodoc-typehints links them.
    ("py:class", "collections.abc.Callable"),
    ("py:class", "collections.abc.Sequence"),
    ("py:class", "collections.abc.Iterator"),
    ("py:class", "os.PathLike"),
    ("py:class", "pathlib.Path"),
    ("py:data", "typing.Any"),
    ("py:data", "typing.Literal"),
    ("py:data", "typing.Union"),
]

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "scvae-tools"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
    # Offline build: no launch buttons, no repository links that would need network.
    "use_download_button": True,
    "use_fullscreen_button": False,
}
html_show_sourcelink = False


# -- Hooks ----------------------------------------------------------------------------------------
def _public_bases(app, name, obj, options, bases):
    """Show a class's public ancestors instead of a private base (``_Latent``).

    A private base has no page, so a link to it could not resolve.
    """
    resolved = []
    for base in bases:
        while base.__name__.startswith("_") and base.__bases__ and base is not object:
            base = base.__bases__[0]
        resolved.append(base)
    bases[:] = list(dict.fromkeys(resolved))


_SECTION_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
# A NumPy "Returns" entry proper: ``name : type`` or a bare type such as ``np.ndarray | None``.
_TYPED_RETURN = re.compile(r"^\s*(\S+ : |[\w.\[\]`:~]+(\s*[|,]\s*[\w.\[\]`:~]+)*\s*$)")


def _free_text_returns(app, what, name, obj, options, lines):
    """Render a free-text ``Returns`` section as one paragraph, not as a list of types.

    Our docstrings follow scanpy: a ``Returns`` section may be prose (``The model, in evaluation
    mode.``) instead of NumPy's ``name : type`` entries. Napoleon would read every unindented
    line of such prose as a return *type* (italic, linked, one bullet per line). This runs before
    napoleon and turns the section into a ``:returns:`` field with the prose as its body.
    Sections in the NumPy form are left to napoleon.
    """
    for i in range(len(lines) - 1):
        if lines[i].strip() != "Returns" or not _SECTION_UNDERLINE.match(lines[i + 1]):
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        start = i + 2
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start == len(lines) or _TYPED_RETURN.match(lines[start]):
            return
        end = start
        while end < len(lines):
            line = lines[end]
            next_is_header = end + 1 < len(lines) and _SECTION_UNDERLINE.match(lines[end + 1])
            if line.strip() and next_is_header and len(line) - len(line.lstrip()) <= indent:
                break
            end += 1
        body = [
            f"{' ' * indent}    {line[indent:]}" if line.strip() else ""
            for line in lines[start:end]
        ]
        # Two blank lines end napoleon's previous section (Parameters would swallow the field).
        lines[i:end] = ["", "", f"{' ' * indent}:returns:", *body, ""]
        return


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
    # Before napoleon, which listens to the same event with the default priority 500.
    app.connect("autodoc-process-docstring", _free_text_returns, priority=400)
