/*
 * walstate._speedups: two inner loops in C, as a plain CPython extension
 * because they build Python objects (the WAL itself is the cffi module).
 *
 * put(): the engine's put without a cffi crossing: appends through
 * wal_put_nowait (reached by its address, taken from the cffi module) with
 * the GIL held, then stores the value in the in-memory table. The caller
 * holds the engine's write lock; when the append would block it gets
 * WAL_EAGAIN back and takes the ordinary path, which releases the GIL.
 *
 * apply(): the inner loop of crash recovery. Applies the PUT
 * and DELETE records of one batch read by wal_reader_batch to the in-memory
 * table (a dict: key -> value, None for a delete), in order, and stops at the
 * first record of any other type (a BATCH, an ignorable record), which the
 * Python side handles (walstate/recovery.py) before calling again after it.
 *
 * The record framing was validated by the C reader (CRC, bounds); the
 * payloads are still checked here before use: a malformed one is ValueError.
 * Payload encodings: docs/FORMAT.md, "Payloads".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "wal_format.h"

/* apply(table, data, offs, lens, types, start, n) -> index of the first record
 * at or after `start` that is neither PUT nor DELETE (n if none).
 * data: a buffer holding the payloads; offs/lens: buffers of n uint64; types:
 * a buffer of n uint8. */
static PyObject *apply(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *table;
    Py_buffer data, offs, lens, types;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "O!y*y*y*y*nn", &PyDict_Type, &table, &data, &offs, &lens,
                          &types, &start, &n))
        return NULL;
    PyObject *result = NULL;
    if (n < 0 || start < 0 || start > n || offs.len < n * 8 || lens.len < n * 8 ||
        types.len < n) {
        PyErr_SetString(PyExc_ValueError, "replay.apply: arrays shorter than n");
        goto out;
    }
    const uint8_t *d = data.buf, *t = types.buf;
    Py_ssize_t i = start;
    for (; i < n; i++) {
        uint64_t off, len;
        memcpy(&off, (const uint8_t *)offs.buf + 8 * i, 8);
        memcpy(&len, (const uint8_t *)lens.buf + 8 * i, 8);
        if (off > (uint64_t)data.len || len > (uint64_t)data.len - off) {
            PyErr_Format(PyExc_ValueError, "record %zd lies outside the data", i);
            goto out;
        }
        const uint8_t *p = d + off;
        PyObject *k, *v;
        if (t[i] == WAL_TYPE_PUT) {
            size_t klen = len >= 2 ? (size_t)(p[0] | p[1] << 8) : 0;
            if (klen == 0 || 2 + klen > len) {
                PyErr_Format(PyExc_ValueError, "record %zd: malformed PUT payload", i);
                goto out;
            }
            k = PyBytes_FromStringAndSize((const char *)p + 2, (Py_ssize_t)klen);
            v = k ? PyBytes_FromStringAndSize((const char *)p + 2 + klen,
                                              (Py_ssize_t)(len - 2 - klen))
                  : NULL;
        } else if (t[i] == WAL_TYPE_DELETE) {
            if (len == 0) {
                PyErr_Format(PyExc_ValueError, "record %zd: empty DELETE payload", i);
                goto out;
            }
            k = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)len);
            v = Py_None;
            Py_INCREF(v);
        } else {
            break;
        }
        if (!k || !v) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            goto out;
        }
        int rc = PyDict_SetItem(table, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        if (rc < 0)
            goto out;
    }
    result = PyLong_FromSsize_t(i);
out:
    PyBuffer_Release(&data);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&lens);
    PyBuffer_Release(&types);
    return result;
}

typedef int (*put_fn)(void *w, const void *key, size_t klen, const void *val, size_t vlen,
                      uint64_t *lsn_out);

/* put(fn, wal, table, key, value) -> LSN (> 0) once appended and stored in table, or
 * the C code (<= 0, table untouched): WAL_EAGAIN when the append would block.
 * fn: address of wal_put_nowait; wal: the wal_t handle's address; key, value: bytes. */
static PyObject *put(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long fn, wal;
    PyObject *table, *key, *value;
    if (!PyArg_ParseTuple(args, "KKO!SS", &fn, &wal, &PyDict_Type, &table, &key, &value))
        return NULL;
    if (!fn || !wal) {
        PyErr_SetString(PyExc_ValueError, "put: null function or handle");
        return NULL;
    }
    uint64_t lsn = 0;
    int rc = ((put_fn)(uintptr_t)fn)((void *)(uintptr_t)wal, PyBytes_AS_STRING(key),
                                     (size_t)PyBytes_GET_SIZE(key), PyBytes_AS_STRING(value),
                                     (size_t)PyBytes_GET_SIZE(value), &lsn);
    if (rc != 0)
        return PyLong_FromLong(rc);
    if (PyDict_SetItem(table, key, value) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(lsn);
}

static PyMethodDef methods[] = {
    {"put", put, METH_VARARGS,
     "put(fn, wal, table, key, value) -> LSN once appended and stored, or the C code (<= 0)"},
    {"apply", apply, METH_VARARGS,
     "apply(table, data, offs, lens, types, start, n) -> index of the first record that "
     "is neither PUT nor DELETE"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "walstate._speedups",
                                    "The engine's put and recovery's inner loop, in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
