import sys

from mistral_chat.bench.command import main

sys.exit(main())
