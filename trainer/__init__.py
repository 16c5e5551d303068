"""Training: base presets, the training loop, the methods (one folder each) and the export.

Importing this package has PEFT's ``PeftModel.from_pretrained`` load the PEFT methods tunehub
adds (bottleneck adapters): registered now if peft is imported, else when it is (see
:mod:`tunehub.peft_methods`); importing it does not import torch or peft itself.
"""

from tunehub.peft_methods import install as _install_peft_methods

_install_peft_methods()
