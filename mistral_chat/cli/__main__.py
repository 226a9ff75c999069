"""`python -m mistral_chat.cli` (as torchrun starts each rank): the `mistral-chat` command."""

import sys

from mistral_chat.cli.main import main

sys.exit(main())
