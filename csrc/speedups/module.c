/*
 * walstate._speedups: the hot path and an inner loop in C, as a plain CPython extension
 * because they build Python objects (the WAL itself is the cffi module).
 *
 * Hot: the engine's put and get without a Python frame or a cffi crossing:
 * appends through wal_put_nowait (reached by its address, taken from the cffi
 * module) with the GIL held, then stores the value in the in-memory table.
 * When the append would block (WAL_EAGAIN) it takes the engine's general path,
 * which releases the GIL. encode_batch(): a BATCH payload.
 *
 * Replay: the table of crash recovery, built in C. Its apply() applies the
 * PUT and DELETE records of one batch read by wal_reader_batch, in order, and
 * stops at the first record of any other type (a BATCH, an ignorable record),
 * which the Python side handles (walstate/recovery.py) before calling again
 * after it; table() gives the dict (key -> value, None for a delete).
 *
 * The record framing was validated by the C reader (CRC, bounds); the
 * payloads are still checked here before use: a malformed one is ValueError.
 * Payload encodings: docs/FORMAT.md, "Payloads".
 *
 * Files: hot.c (Hot), batch.c (BatchOps, encode_batch), replay.c (Replay),
 * sort.c (sorted_items), this one (the module, its constants from
 * wal_format.h, keyword arguments); speedups.h declares what they share.
 * Hot.put/get and BatchOps.put/delete also take their arguments by keyword
 * (key, value / key, default / key), as the engine's public methods do.
 */
#include "speedups.h"

int sp_kwargs(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
              const char *const *names, Py_ssize_t nnames, Py_ssize_t nrequired,
              PyObject **out)
{
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", fname,
                     nnames, nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0));
        return -1;
    }
    for (Py_ssize_t i = 0; i < nnames; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        while (i < nnames && PyUnicode_CompareWithASCIIString(name, names[i]) != 0)
            i++;
        if (i == nnames) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'", fname,
                         name);
            return -1;
        }
        if (out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[i]);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < nrequired; i++)
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %zd)", fname,
                         names[i], i + 1);
            return -1;
        }
    return 0;
}

static PyMethodDef methods[] = {
    {"sorted_items", sp_sorted_items, METH_O,
     "sorted_items(table) -> its (key, value) items in key order, sorted without the GIL"},
    {"encode_batch", sp_encode_batch, METH_O,
     "encode_batch(ops) -> the BATCH payload of a list of (key, value-or-None) pairs"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "walstate._speedups",
                                    "The engine's hot path and recovery's inner loop, in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__speedups(void)
{
    if (PyType_Ready(&HotType) < 0 || PyType_Ready(&ReplayType) < 0 ||
        PyType_Ready(&BatchOpsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hot", (PyObject *)&HotType) < 0 ||
        PyModule_AddObjectRef(m, "Replay", (PyObject *)&ReplayType) < 0 ||
        PyModule_AddObjectRef(m, "BatchOps", (PyObject *)&BatchOpsType) < 0 ||
        /* the format's sizes and the engine's limits this module uses (wal_format.h,
         * the same names as walstate._walc.lib's) */
        PyModule_AddIntConstant(m, "WAL_REC_HDR_SIZE", WAL_REC_HDR_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "WAL_REC_MAX_PAYLOAD", WAL_REC_MAX_PAYLOAD) < 0 ||
        PyModule_AddIntConstant(m, "WAL_TYPE_PUT", WAL_TYPE_PUT) < 0 ||
        PyModule_AddIntConstant(m, "WAL_TYPE_DELETE", WAL_TYPE_DELETE) < 0 ||
        PyModule_AddIntConstant(m, "WAL_TYPE_BATCH", WAL_TYPE_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "WAL_PUT_HDR_SIZE", WAL_PUT_HDR_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "WAL_BATCH_HDR_SIZE", WAL_BATCH_HDR_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "WAL_BATCH_OP_HDR_SIZE", WAL_BATCH_OP_HDR_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "WAL_BATCH_OP_PUT", WAL_BATCH_OP_PUT) < 0 ||
        PyModule_AddIntConstant(m, "WAL_BATCH_OP_DELETE", WAL_BATCH_OP_DELETE) < 0 ||
        PyModule_AddIntConstant(m, "WAL_MAX_KEY", WAL_MAX_KEY) < 0 ||
        PyModule_AddIntConstant(m, "WAL_MAX_VALUE", WAL_MAX_VALUE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
