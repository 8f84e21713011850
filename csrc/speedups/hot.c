/* walstate._speedups.Hot: the engine's put and get, in C (see module.c). */
#include "speedups.h"

typedef int (*put_fn)(void *w, const void *key, size_t klen, const void *val, size_t vlen,
                      uint64_t *lsn_out);
typedef int (*sync_fn)(void *w, uint64_t lsn, uint64_t *durable_out);


/*
 * Hot: the engine's hot path (Engine.put and Engine.get) as one C object, so
 * that a put or a get of a recent key costs one C call and no Python frame.
 *
 * It owns the state that path touches -- the in-memory table, the last LSN,
 * the WAL byte counters -- and the engine reads and writes that state through
 * its attributes. Anything out of the ordinary (a non-bytes key, a limit
 * exceeded, a closed or failed engine, an append that would wait for the
 * log's mutex or for I/O, a Python caller inside the engine's lock: `busy`)
 * goes to the Python callables given at construction, with the same
 * arguments, so the errors and the blocking path live in one place
 * (walstate/engine.py). Everything here runs with the GIL held and never
 * releases it, so a fast put is atomic with respect to every other Python
 * thread; Python code that updates the table with the GIL released in between
 * raises `busy` first.
 */
typedef struct {
    PyObject_HEAD
    put_fn put;            /* wal_put_nowait, or NULL: no log (read-only) */
    sync_fn sync;          /* wal_sync, or NULL */
    void *wal;             /* its handle */
    PyObject *table;       /* the in-memory table: a dict (else: the slow path) */
    PyObject *slow_put;    /* slow_put(key, value) -> LSN: the general put */
    PyObject *ack;         /* ack(lsn) -> LSN: waits per sync mode, asks for a checkpoint */
    PyObject *slow_get;    /* slow_get(key, default=None): the general get */
    PyObject *frozen;      /* tables being checkpointed, newest first: a tuple of dicts */
    PyObject *snap_get;    /* snap_get(key) -> value or None: the snapshot, or None */
    int writable;          /* 0: every put takes the slow path */
    int sync_always;       /* 1: every put ends in ack() */
    int busy;              /* > 0: a Python thread is inside the engine's lock */
    int in_sync;           /* threads inside sync() here, without the GIL: the log
                            * handle may be closed only once this is 0 (after
                            * set_wal(0, 0) stopped new ones) */
    unsigned long long last_lsn;
    long long puts;        /* puts done here */
    long long wal_bytes;   /* record bytes appended since open */
    long long frozen_bytes;/* wal_bytes when the table was last frozen */
    long long threshold;   /* wal_bytes - frozen_bytes above this: ack() */
} Hot;

static int hot_init(Hot *h, PyObject *args, PyObject *kw)
{
    static char *names[] = {"slow_put", "ack", "slow_get", NULL};
    PyObject *slow_put, *ack, *slow_get;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO", names, &slow_put, &ack, &slow_get))
        return -1;
    if (!PyCallable_Check(slow_put) || !PyCallable_Check(ack) || !PyCallable_Check(slow_get)) {
        PyErr_SetString(PyExc_TypeError, "Hot: slow_put, ack and slow_get must be callable");
        return -1;
    }
    Py_INCREF(slow_put);
    Py_INCREF(ack);
    Py_INCREF(slow_get);
    Py_XSETREF(h->slow_put, slow_put);
    Py_XSETREF(h->ack, ack);
    Py_XSETREF(h->slow_get, slow_get);
    if (!h->table)
        h->table = PyDict_New();
    h->threshold = LLONG_MAX;
    return h->table ? 0 : -1;
}

static int hot_traverse(Hot *h, visitproc visit, void *arg)
{
    Py_VISIT(h->table);
    Py_VISIT(h->slow_put);
    Py_VISIT(h->ack);
    Py_VISIT(h->slow_get);
    Py_VISIT(h->frozen);
    Py_VISIT(h->snap_get);
    return 0;
}

static int hot_clear(Hot *h)
{
    Py_CLEAR(h->table);
    Py_CLEAR(h->slow_put);
    Py_CLEAR(h->ack);
    Py_CLEAR(h->slow_get);
    Py_CLEAR(h->frozen);
    Py_CLEAR(h->snap_get);
    return 0;
}

static void hot_dealloc(Hot *h)
{
    PyObject_GC_UnTrack(h);
    hot_clear(h);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static const char *const put_names[] = {"key", "value"};
static const char *const get_names[] = {"key", "default"};

/* put(key, value) -> LSN; by position (the fast path as it is), or by keyword:
 * then the arguments are put in place first. */
static PyObject *hot_put(Hot *h, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *kw[2];
    if (kwnames) {
        if (sp_kwargs("put", args, nargs, kwnames, put_names, 2, 2, kw) < 0)
            return NULL;
        args = kw, nargs = 2;
    }
    PyObject *table = h->table;
    if (nargs != 2 || !h->writable || h->busy || !h->put || !table ||
        !PyDict_CheckExact(table) || !h->slow_put || !h->ack)
        goto slow;
    PyObject *key = args[0], *value = args[1];
    if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(value))
        goto slow;
    Py_ssize_t klen = PyBytes_GET_SIZE(key), vlen = PyBytes_GET_SIZE(value);
    if (klen == 0 || klen > WAL_MAX_KEY || vlen > WAL_MAX_VALUE)
        goto slow;
    uint64_t lsn = 0;
    if (h->put(h->wal, PyBytes_AS_STRING(key), (size_t)klen, PyBytes_AS_STRING(value),
               (size_t)vlen, &lsn) != 0)
        goto slow;  /* would block, or an error the slow path reports */
    if (PyDict_SetItem(table, key, value) < 0)
        return NULL;  /* out of memory: the record is in the log; replay applies it */
    h->last_lsn = lsn;
    h->puts++;
    h->wal_bytes += WAL_REC_HDR_SIZE + WAL_PUT_HDR_SIZE + klen + vlen;
    if (h->sync_always && h->sync && h->wal_bytes - h->frozen_bytes <= h->threshold) {
        /* a durable put: wait for the fdatasync here, without the GIL (the
         * engine closes the handle only after set_wal(0, 0) and once in_sync is
         * back to 0) */
        void *wal = h->wal;
        sync_fn sync = h->sync;
        int rc;
        h->in_sync++;
        Py_BEGIN_ALLOW_THREADS
        rc = sync(wal, lsn, NULL);
        Py_END_ALLOW_THREADS
        h->in_sync--;
        if (rc == 0)
            return PyLong_FromUnsignedLongLong(lsn);
        /* a failed sync: ack() syncs again and raises what the log says */
    }
    PyObject *res = PyLong_FromUnsignedLongLong(lsn);
    if (res && (h->sync_always || h->wal_bytes - h->frozen_bytes > h->threshold)) {
        PyObject *r = PyObject_CallOneArg(h->ack, res);
        Py_DECREF(res);
        return r;
    }
    return res;
slow:
    if (!h->slow_put) {
        PyErr_SetString(PyExc_RuntimeError, "Hot: not initialised");
        return NULL;
    }
    return PyObject_Vectorcall(h->slow_put, args, (size_t)nargs, NULL);
}

/* get(key, default=None) */
static PyObject *hot_get(Hot *h, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *kw[2];
    if (kwnames) {
        if (sp_kwargs("get", args, nargs, kwnames, get_names, 2, 1, kw) < 0)
            return NULL;
        args = kw, nargs = kw[1] ? 2 : 1;
    }
    PyObject *table = h->table;
    if (nargs < 1 || nargs > 2 || !table || !PyDict_CheckExact(table) ||
        !PyBytes_CheckExact(args[0]))
        goto slow;
    PyObject *key = args[0], *dflt = nargs > 1 ? args[1] : Py_None;
    PyObject *v = PyDict_GetItemWithError(table, key);  /* borrowed */
    if (!v) {
        if (PyErr_Occurred())
            return NULL;
        Py_ssize_t klen = PyBytes_GET_SIZE(key);
        PyObject *frozen = h->frozen;
        if (klen == 0 || klen > WAL_MAX_KEY || !frozen || !PyTuple_CheckExact(frozen) ||
            !h->snap_get || h->snap_get == Py_None)
            goto slow;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(frozen) && !v; i++) {
            PyObject *t = PyTuple_GET_ITEM(frozen, i);
            if (!PyDict_CheckExact(t))
                goto slow;
            v = PyDict_GetItemWithError(t, key);
            if (!v && PyErr_Occurred())
                return NULL;
        }
        if (!v) {  /* not changed since the last checkpoint: the snapshot */
            PyObject *snap_get = h->snap_get;
            Py_INCREF(snap_get);  /* the call may replace h->snap_get */
            v = PyObject_CallOneArg(snap_get, key);
            Py_DECREF(snap_get);
            if (!v || v != Py_None)
                return v;
            Py_DECREF(v);
            Py_INCREF(dflt);
            return dflt;
        }
    }
    if (v == Py_None)  /* deleted since the last checkpoint */
        v = dflt;
    Py_INCREF(v);
    return v;
slow:
    if (!h->slow_get) {
        PyErr_SetString(PyExc_RuntimeError, "Hot: not initialised");
        return NULL;
    }
    return PyObject_Vectorcall(h->slow_get, args, (size_t)nargs, NULL);
}

/* set_wal(put, wal, sync=0): the log to append to (the addresses of
 * wal_put_nowait, of the handle and of wal_sync, from Wal.hot_args), or
 * set_wal(0, 0): none (every put takes the slow path). */
static PyObject *hot_set_wal(Hot *h, PyObject *args)
{
    unsigned long long fn, wal, sync = 0;
    if (!PyArg_ParseTuple(args, "KK|K", &fn, &wal, &sync))
        return NULL;
    if ((fn == 0) != (wal == 0) || (sync && !wal)) {
        PyErr_SetString(PyExc_ValueError, "set_wal: a handle with its functions, or none");
        return NULL;
    }
    h->put = (put_fn)(uintptr_t)fn;
    h->wal = (void *)(uintptr_t)wal;
    h->sync = (sync_fn)(uintptr_t)sync;
    Py_RETURN_NONE;
}

static PyMethodDef hot_methods[] = {
    {"put", (PyCFunction)(void (*)(void))hot_put, METH_FASTCALL | METH_KEYWORDS,
     "put(key, value) -> LSN: Engine.put (the general case in slow_put)"},
    {"get", (PyCFunction)(void (*)(void))hot_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None): Engine.get (the general case in slow_get)"},
    {"set_wal", (PyCFunction)hot_set_wal, METH_VARARGS,
     "set_wal(put, wal, sync=0): the addresses of wal_put_nowait, the handle and wal_sync "
     "(0, 0: none)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef hot_members[] = {
    {"table", T_OBJECT, offsetof(Hot, table), 0, "the in-memory table"},
    {"writable", T_INT, offsetof(Hot, writable), 0, "0: every put takes the slow path"},
    {"sync_always", T_INT, offsetof(Hot, sync_always), 0, "1: every put ends in ack()"},
    {"busy", T_INT, offsetof(Hot, busy), 0, "> 0: puts take the slow path"},
    {"in_sync", T_INT, offsetof(Hot, in_sync), READONLY, "threads syncing the log here"},
    {"last_lsn", T_ULONGLONG, offsetof(Hot, last_lsn), 0, "LSN of the last write"},
    {"puts", T_LONGLONG, offsetof(Hot, puts), 0, "puts done in C"},
    {"wal_bytes", T_LONGLONG, offsetof(Hot, wal_bytes), 0, "record bytes appended"},
    {"frozen_bytes", T_LONGLONG, offsetof(Hot, frozen_bytes), 0, "wal_bytes at the last freeze"},
    {"threshold", T_LONGLONG, offsetof(Hot, threshold), 0, "bytes since freeze that call ack()"},
    {"frozen", T_OBJECT, offsetof(Hot, frozen), 0, "the tables being checkpointed, newest first"},
    {"snap_get", T_OBJECT, offsetof(Hot, snap_get), 0, "snap_get(key): the snapshot's get"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject HotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "walstate._speedups.Hot",
    .tp_basicsize = sizeof(Hot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Hot(slow_put, ack, slow_get): the engine's put and get in C",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hot_init,
    .tp_dealloc = (destructor)hot_dealloc,
    .tp_traverse = (traverseproc)hot_traverse,
    .tp_clear = (inquiry)hot_clear,
    .tp_methods = hot_methods,
    .tp_members = hot_members,
};
