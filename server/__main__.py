import sys

from server.app import main

if __name__ == '__main__':  # not when the writer process imports it
    sys.exit(main())
