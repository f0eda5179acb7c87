"""Edge bundles: an exported folder packed for deployment, with a manifest the receiver checks before loading.

A bundle (a folder, or the same files in a .zip / .tar.gz) holds what a runtime needs -- the graph and its
external data, config.json, generation_config.json, the tokenizer files and chat template, qcompile.json (the
session options our runner applies) -- plus two files written here:

* ``genai_config.json``: onnxruntime-genai's description of the decoder, so ``onnxruntime_genai.Model(bundle)``
  loads and generates from it as it is (``genai``);
* ``manifest.json``: where the bundle came from (qcompile version, recipe, source model hash), what was measured
  (quality and speed from report.json), what it needs (ONNX Runtime version, session options), and the sha256
  and size of every other file. ``verify`` checks them before anything is loaded. It detects corruption and
  truncation, not a deliberate forgery: whoever can rewrite the files can rewrite the manifest.

Bundles are written into a temporary sibling and renamed into place (an interrupted run leaves nothing);
archives are extracted only after every member's path and type is checked (``archive``). ``inspect`` reads a
bundle or an exported folder without running it.
"""

from qcompile.bundle.archive import FORMATS, ArchiveError, archive_format
from qcompile.bundle.genai import GENAI_CONFIG_FILE, genai_config
from qcompile.bundle.contents import format_text, inspect
from qcompile.bundle.pack import MANIFEST_FILE, BundleError, opened, package, verify

__all__ = [
    "FORMATS", "ArchiveError", "archive_format", "GENAI_CONFIG_FILE", "genai_config", "format_text", "inspect",
    "MANIFEST_FILE", "BundleError", "opened", "package", "verify",
]
