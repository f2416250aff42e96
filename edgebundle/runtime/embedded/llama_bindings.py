"""llama-cpp-python's ctypes bindings of llama.cpp (``llama_cpp.llama_cpp``), alone.

The GGML backend (:mod:`.ggml`) calls only llama.cpp's C API, which that one module
binds. Importing it the ordinary way runs the package's ``__init__`` first, and that
imports the high-level ``Llama`` class with numpy, jinja2 and the chat formats: about
100 ms and 20 MiB in every guest process for code it never calls. So the bindings are
loaded under a stand-in for the package, a bare module whose ``__path__`` is the real
package's folder, found by ``importlib.util.find_spec`` without running it: the
bindings' own imports (``llama_cpp._ctypes_extensions``, the shared library from the
package's ``lib/``) resolve there as usual. The stand-in leaves ``sys.modules`` as soon
as the bindings are loaded, so a later ``import llama_cpp`` (the JSON-schema grammar
of :mod:`.metadata`, or a test) runs the real ``__init__``, which finds
``llama_cpp.llama_cpp`` already imported and reuses it: one copy of the library.
If the package is already imported, its own bindings are used.

Checked by tests/test_cli_lazy.py against the installed llama-cpp-python (the
bindings module has been ``llama_cpp/llama_cpp.py`` since its first release).
Importing this module loads the library; :mod:`.ggml` does so on the first load.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

BINDINGS = "llama_cpp.llama_cpp"


def load_bindings() -> Any:
    """The ``llama_cpp.llama_cpp`` module, without the package's ``__init__`` if it is
    not imported yet."""
    if "llama_cpp" in sys.modules or BINDINGS in sys.modules:
        return importlib.import_module(BINDINGS)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'llama_cpp'", name="llama_cpp")
    stand_in = types.ModuleType("llama_cpp")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["llama_cpp"] = stand_in
    try:
        return importlib.import_module(BINDINGS)
    finally:
        if sys.modules.get("llama_cpp") is stand_in:
            del sys.modules["llama_cpp"]


if TYPE_CHECKING:
    from llama_cpp import llama_cpp as llama_cpp
else:
    llama_cpp = load_bindings()
