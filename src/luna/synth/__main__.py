"""``python -m luna.synth``: the luna-synth command line (as when it was one module)."""

from luna.synth.app import main

main()
