import signal
import sys

from tasks.cli import exit_on_sigterm, main

signal.signal(signal.SIGTERM, exit_on_sigterm)  # before any stage code; tasks.tracking keeps it
sys.exit(main())
