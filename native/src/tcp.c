/* Python bindings and loops owned by this file; the table is merged into comms._native
 * by module.c. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyMethodDef tc_tcp_methods[] = {{NULL, NULL, 0, NULL}};
