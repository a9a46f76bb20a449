import os
import sys

# Tests import the helper modules in this folder (rank workers are pickled by module name).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CI has no GPU; GPU tests opt in explicitly
