// libpyqkern.so is the whole static core (linked --whole-archive); this file only gives the
// shared library target a source of its own.
#include "pyqkern/pyqkern.h"
