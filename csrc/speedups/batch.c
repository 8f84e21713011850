/* walstate._speedups.BatchOps and encode_batch: a batch's operations and
 * its BATCH payload, in C (see module.c). */
#include "speedups.h"

/*
 * BatchOps: Batch.put and Batch.delete (walstate/engine.py) in C: the
 * operations of an open batch as a list of (key, value-or-None), and the
 * payload size they add up to. Anything out of the ordinary (other types, a
 * limit, a finished batch) goes to the Python methods given at construction,
 * with the same arguments: they raise the errors.
 */
typedef struct {
    PyObject_HEAD
    PyObject *ops;          /* list of (key, value or None) */
    PyObject *slow_put, *slow_delete;
    Py_ssize_t size, limit; /* payload bytes so far; the record limit */
    int done;
} BatchOps;

static int bo_init(BatchOps *b, PyObject *args, PyObject *kw)
{
    static char *names[] = {"slow_put", "slow_delete", "limit", NULL};
    PyObject *sp, *sd;
    Py_ssize_t limit;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOn", names, &sp, &sd, &limit))
        return -1;
    if (!PyCallable_Check(sp) || !PyCallable_Check(sd)) {
        PyErr_SetString(PyExc_TypeError, "BatchOps: slow_put and slow_delete must be callable");
        return -1;
    }
    Py_XSETREF(b->slow_put, Py_NewRef(sp));
    Py_XSETREF(b->slow_delete, Py_NewRef(sd));
    Py_XSETREF(b->ops, PyList_New(0));
    b->size = WAL_BATCH_HDR_SIZE, b->limit = limit, b->done = 0;
    return b->ops ? 0 : -1;
}

static int bo_traverse(BatchOps *b, visitproc visit, void *arg)
{
    Py_VISIT(b->ops);
    Py_VISIT(b->slow_put);
    Py_VISIT(b->slow_delete);
    return 0;
}

static int bo_clear(BatchOps *b)
{
    Py_CLEAR(b->ops);
    Py_CLEAR(b->slow_put);
    Py_CLEAR(b->slow_delete);
    return 0;
}

static void bo_dealloc(BatchOps *b)
{
    PyObject_GC_UnTrack(b);
    bo_clear(b);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

/* Appends (key, value) when both are fine; 1 if done, 0 if the slow path must. */
static int bo_add(BatchOps *b, PyObject *key, PyObject *value)
{
    if (b->done || !b->ops || !PyList_CheckExact(b->ops) || !PyBytes_CheckExact(key))
        return 0;
    Py_ssize_t klen = PyBytes_GET_SIZE(key), vlen = 0;
    if (value != Py_None) {
        if (!PyBytes_CheckExact(value))
            return 0;
        vlen = PyBytes_GET_SIZE(value);
    }
    if (klen == 0 || klen > WAL_MAX_KEY || vlen > WAL_MAX_VALUE ||
        b->size + WAL_BATCH_OP_HDR_SIZE + klen + vlen > b->limit)
        return 0;
    PyObject *t = PyTuple_Pack(2, key, value);
    if (!t || PyList_Append(b->ops, t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    Py_DECREF(t);
    b->size += WAL_BATCH_OP_HDR_SIZE + klen + vlen;
    return 1;
}

static const char *const put_names[] = {"key", "value"};
static const char *const delete_names[] = {"key"};

/* put(key, value), by position or keyword (put in place first) */
static PyObject *bo_put(BatchOps *b, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *kw[2];
    if (kwnames) {
        if (sp_kwargs("put", args, nargs, kwnames, put_names, 2, 2, kw) < 0)
            return NULL;
        args = kw, nargs = 2;
    }
    int rc = nargs == 2 && args[1] != Py_None ? bo_add(b, args[0], args[1]) : 0;
    if (rc < 0)
        return NULL;
    if (rc)
        Py_RETURN_NONE;
    if (!b->slow_put) {
        PyErr_SetString(PyExc_RuntimeError, "BatchOps: not initialised");
        return NULL;
    }
    return PyObject_Vectorcall(b->slow_put, args, (size_t)nargs, NULL);
}

/* delete(key), by position or keyword */
static PyObject *bo_delete(BatchOps *b, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *kw[1];
    if (kwnames) {
        if (sp_kwargs("delete", args, nargs, kwnames, delete_names, 1, 1, kw) < 0)
            return NULL;
        args = kw, nargs = 1;
    }
    int rc = nargs == 1 ? bo_add(b, args[0], Py_None) : 0;
    if (rc < 0)
        return NULL;
    if (rc)
        Py_RETURN_NONE;
    if (!b->slow_delete) {
        PyErr_SetString(PyExc_RuntimeError, "BatchOps: not initialised");
        return NULL;
    }
    return PyObject_Vectorcall(b->slow_delete, args, (size_t)nargs, NULL);
}

static PyMethodDef bo_methods[] = {
    {"put", (PyCFunction)(void (*)(void))bo_put, METH_FASTCALL | METH_KEYWORDS,
     "put(key, value): Batch.put"},
    {"delete", (PyCFunction)(void (*)(void))bo_delete, METH_FASTCALL | METH_KEYWORDS,
     "delete(key): Batch.delete"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef bo_members[] = {
    {"ops", T_OBJECT, offsetof(BatchOps, ops), 0, "the operations: (key, value or None)"},
    {"size", T_PYSSIZET, offsetof(BatchOps, size), 0, "their payload bytes"},
    {"done", T_INT, offsetof(BatchOps, done), 0, "1: committed or discarded"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject BatchOpsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "walstate._speedups.BatchOps",
    .tp_basicsize = sizeof(BatchOps),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "BatchOps(slow_put, slow_delete, limit): Batch.put and Batch.delete in C",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)bo_init,
    .tp_dealloc = (destructor)bo_dealloc,
    .tp_traverse = (traverseproc)bo_traverse,
    .tp_clear = (inquiry)bo_clear,
    .tp_methods = bo_methods,
    .tp_members = bo_members,
};

/* encode_batch(ops) -> the BATCH payload of a list of (key, value-or-None) pairs of
 * bytes (docs/FORMAT.md, "Payloads"; the twin of walstate/codec.py encode_batch). */
PyObject *sp_encode_batch(PyObject *self, PyObject *ops)
{
    (void)self;
    if (!PyList_CheckExact(ops)) {
        PyErr_SetString(PyExc_TypeError, "encode_batch: ops must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(ops);
    if ((size_t)n > 0xffffffffu) {
        PyErr_SetString(PyExc_ValueError, "encode_batch: too many operations");
        return NULL;
    }
    size_t total = WAL_BATCH_HDR_SIZE;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_CheckExact(op) || PyTuple_GET_SIZE(op) != 2 ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(op, 0)) ||
            !(PyTuple_GET_ITEM(op, 1) == Py_None || PyBytes_CheckExact(PyTuple_GET_ITEM(op, 1)))) {
            PyErr_Format(PyExc_TypeError, "encode_batch: operation %zd is not (bytes, bytes "
                         "or None)", i);
            return NULL;
        }
        Py_ssize_t kl = PyBytes_GET_SIZE(PyTuple_GET_ITEM(op, 0));
        PyObject *v = PyTuple_GET_ITEM(op, 1);
        Py_ssize_t vl = v == Py_None ? 0 : PyBytes_GET_SIZE(v);
        if (kl == 0 || kl > 0xffff || (unsigned long long)vl > 0xffffffffull) {
            PyErr_Format(PyExc_ValueError, "encode_batch: operation %zd: key or value length "
                         "out of range", i);
            return NULL;
        }
        total += WAL_BATCH_OP_HDR_SIZE + (size_t)kl + (size_t)vl;
        if (total > (size_t)PY_SSIZE_T_MAX / 2) {
            PyErr_SetString(PyExc_ValueError, "encode_batch: payload too large");
            return NULL;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!out)
        return NULL;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    uint32_t cnt = (uint32_t)n;
    p[0] = (uint8_t)cnt, p[1] = (uint8_t)(cnt >> 8), p[2] = (uint8_t)(cnt >> 16);
    p[3] = (uint8_t)(cnt >> 24);
    p += WAL_BATCH_HDR_SIZE;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        PyObject *k = PyTuple_GET_ITEM(op, 0), *v = PyTuple_GET_ITEM(op, 1);
        size_t kl = (size_t)PyBytes_GET_SIZE(k);
        size_t vl = v == Py_None ? 0 : (size_t)PyBytes_GET_SIZE(v);
        p[0] = v == Py_None ? WAL_BATCH_OP_DELETE : WAL_BATCH_OP_PUT;
        p[1] = (uint8_t)kl, p[2] = (uint8_t)(kl >> 8);
        p[3] = (uint8_t)vl, p[4] = (uint8_t)(vl >> 8), p[5] = (uint8_t)(vl >> 16);
        p[6] = (uint8_t)(vl >> 24);
        memcpy(p + WAL_BATCH_OP_HDR_SIZE, PyBytes_AS_STRING(k), kl);
        if (vl)
            memcpy(p + WAL_BATCH_OP_HDR_SIZE + kl, PyBytes_AS_STRING(v), vl);
        p += WAL_BATCH_OP_HDR_SIZE + kl + vl;
    }
    return out;
}
