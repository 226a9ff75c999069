import sys

from mistral_chat.bench.run import main

sys.exit(main())
