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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "wal_format.h"

/* One PUT or DELETE record's key and value, checked against the data. */
typedef struct {
    const uint8_t *key, *val;  /* val NULL: a delete */
    size_t klen, vlen;
} rec_kv;

/* Record i's key and value; 1 if it is a PUT or DELETE, 0 if another type, -1
 * (ValueError set) if malformed. */
static int rec_parse_kv(const Py_buffer *data, const Py_buffer *offs, const Py_buffer *lens,
                        const uint8_t *types, Py_ssize_t i, rec_kv *kv)
{
    uint8_t t = types[i];
    if (t != WAL_TYPE_PUT && t != WAL_TYPE_DELETE)
        return 0;
    uint64_t off, len;
    memcpy(&off, (const uint8_t *)offs->buf + 8 * i, 8);
    memcpy(&len, (const uint8_t *)lens->buf + 8 * i, 8);
    if (off > (uint64_t)data->len || len > (uint64_t)data->len - off) {
        PyErr_Format(PyExc_ValueError, "record %zd lies outside the data", i);
        return -1;
    }
    const uint8_t *p = (const uint8_t *)data->buf + off;
    if (t == WAL_TYPE_PUT) {
        size_t klen = len >= 2 ? (size_t)(p[0] | p[1] << 8) : 0;
        if (klen == 0 || 2 + klen > len) {
            PyErr_Format(PyExc_ValueError, "record %zd: malformed PUT payload", i);
            return -1;
        }
        kv->key = p + 2, kv->klen = klen;
        kv->val = p + 2 + klen, kv->vlen = (size_t)len - 2 - klen;
    } else {
        if (len == 0) {
            PyErr_Format(PyExc_ValueError, "record %zd: empty DELETE payload", i);
            return -1;
        }
        kv->key = p, kv->klen = (size_t)len;
        kv->val = NULL, kv->vlen = 0;
    }
    return 1;
}

static uint64_t key_hash(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 29;
        p += 8, n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 32);
}

/*
 * Replay: the table recovery builds, kept in C until the end. Replaying a log
 * of updates into a dict costs, per record, a key and a value object, a dict
 * lookup and the old value's release -- mostly cache misses. Here a record
 * costs a probe of one open-addressing table and a copy of its value into an
 * arena; the Python objects are made once per key, by table().
 *
 * Entries hold a key and its latest value (or a delete) in the arena, key
 * then value; a longer value than the space it has moves to the arena's end.
 */
typedef struct {
    uint64_t hash;       /* 0: empty slot */
    uint64_t off;        /* the key's bytes in the arena, then the value's */
    uint32_t klen;
    uint32_t vlen;       /* UINT32_MAX: deleted */
    uint32_t vcap;       /* room for the value at off + klen */
    uint32_t pad;
} rp_ent;

typedef struct {
    PyObject_HEAD
    rp_ent *ent;
    size_t cap, n;       /* slots (a power of two), keys */
    uint8_t *arena;
    size_t alen, acap;
} Replay;

#define RP_DELETED UINT32_MAX

static int rp_init(Replay *r, PyObject *args, PyObject *kw)
{
    static char *names[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, ":Replay", names))
        return -1;
    PyMem_RawFree(r->ent);
    PyMem_RawFree(r->arena);
    r->cap = 1024, r->n = 0, r->alen = 0, r->acap = 1 << 16;
    r->ent = PyMem_RawCalloc(r->cap, sizeof *r->ent);
    r->arena = PyMem_RawMalloc(r->acap);
    if (!r->ent || !r->arena) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void rp_dealloc(Replay *r)
{
    PyMem_RawFree(r->ent);
    PyMem_RawFree(r->arena);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static uint64_t rp_hash(const uint8_t *p, size_t n)
{
    uint64_t h = key_hash(p, n);
    return h ? h : 1;
}

/* Room for `need` more arena bytes; -1 (MemoryError set) if none. */
static int rp_reserve(Replay *r, size_t need)
{
    if (r->acap - r->alen >= need)
        return 0;
    size_t cap = r->acap;
    while (cap - r->alen < need) {
        if (cap > SIZE_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    uint8_t *a = PyMem_RawRealloc(r->arena, cap);
    if (!a) {
        PyErr_NoMemory();
        return -1;
    }
    r->arena = a, r->acap = cap;
    return 0;
}

static int rp_grow(Replay *r)
{
    size_t cap = r->cap * 2;
    rp_ent *e = PyMem_RawCalloc(cap, sizeof *e);
    if (!e) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < r->cap; i++) {
        if (!r->ent[i].hash)
            continue;
        size_t s = (size_t)r->ent[i].hash & (cap - 1);
        while (e[s].hash)
            s = (s + 1) & (cap - 1);
        e[s] = r->ent[i];
    }
    PyMem_RawFree(r->ent);
    r->ent = e, r->cap = cap;
    return 0;
}

/* key -> value (val NULL: a delete). 0, or -1 with an exception set. */
static int rp_set(Replay *r, const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen)
{
    if (klen > UINT32_MAX / 2 || vlen >= RP_DELETED) {
        PyErr_SetString(PyExc_ValueError, "Replay: key or value too long");
        return -1;
    }
    uint64_t h = rp_hash(key, klen);
    size_t s = (size_t)h & (r->cap - 1);
    rp_ent *e;
    for (;; s = (s + 1) & (r->cap - 1)) {
        e = &r->ent[s];
        if (!e->hash)
            break;
        if (e->hash == h && e->klen == klen && memcmp(r->arena + e->off, key, klen) == 0) {
            if (!val) {
                e->vlen = RP_DELETED;
                return 0;
            }
            if (vlen <= e->vcap) {
                memcpy(r->arena + e->off + klen, val, vlen);
                e->vlen = (uint32_t)vlen;
                return 0;
            }
            if (rp_reserve(r, klen + vlen) < 0)  /* moves to the end of the arena */
                return -1;
            memcpy(r->arena + r->alen, key, klen);
            memcpy(r->arena + r->alen + klen, val, vlen);
            e->off = r->alen, e->vlen = (uint32_t)vlen, e->vcap = (uint32_t)vlen;
            r->alen += klen + vlen;
            return 0;
        }
    }
    if ((r->n + 1) * 2 > r->cap) {  /* at most half full */
        if (rp_grow(r) < 0)
            return -1;
        return rp_set(r, key, klen, val, vlen);
    }
    size_t vl = val ? vlen : 0;
    if (rp_reserve(r, klen + vl) < 0)
        return -1;
    memcpy(r->arena + r->alen, key, klen);
    if (vl)
        memcpy(r->arena + r->alen + klen, val, vl);
    e->hash = h;
    e->off = r->alen, e->klen = (uint32_t)klen;
    e->vlen = val ? (uint32_t)vlen : RP_DELETED, e->vcap = (uint32_t)vl;
    r->alen += klen + vl;
    r->n++;
    return 0;
}

/* Replay.apply(data, offs, lens, types, start, n) -> index of the first record
 * at or after `start` that is neither PUT nor DELETE (n if none), the PUT and
 * DELETE records before it applied in order. data: a buffer holding the
 * payloads; offs/lens: buffers of n uint64; types: a buffer of n uint8. */
static PyObject *rp_apply(Replay *r, PyObject *args)
{
    Py_buffer data, offs, lens, types;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "y*y*y*y*nn", &data, &offs, &lens, &types, &start, &n))
        return NULL;
    PyObject *result = NULL;
    if (n < 0 || start < 0 || start > n || offs.len < n * 8 || lens.len < n * 8 ||
        types.len < n) {
        PyErr_SetString(PyExc_ValueError, "replay.apply: arrays shorter than n");
        goto out;
    }
    if (!r->ent) {
        PyErr_SetString(PyExc_RuntimeError, "Replay: not initialised");
        goto out;
    }
    Py_ssize_t i = start;
    for (; i < n; i++) {
        rec_kv kv;
        int rc = rec_parse_kv(&data, &offs, &lens, types.buf, i, &kv);
        if (rc < 0)
            goto out;
        if (rc == 0)
            break;
        if (rp_set(r, kv.key, kv.klen, kv.val, kv.vlen) < 0)
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

/* r[key] = value (bytes, or None: a delete): the operations of a BATCH record. */
static int rp_ass(Replay *r, PyObject *key, PyObject *value)
{
    if (!value) {
        PyErr_SetString(PyExc_TypeError, "Replay: keys are never removed (store None)");
        return -1;
    }
    if (!r->ent) {
        PyErr_SetString(PyExc_RuntimeError, "Replay: not initialised");
        return -1;
    }
    if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) == 0 ||
        (value != Py_None && !PyBytes_CheckExact(value))) {
        PyErr_SetString(PyExc_TypeError, "Replay: key must be non-empty bytes, value bytes "
                        "or None");
        return -1;
    }
    const uint8_t *v = value == Py_None ? NULL : (const uint8_t *)PyBytes_AS_STRING(value);
    return rp_set(r, (const uint8_t *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key), v,
                  v ? (size_t)PyBytes_GET_SIZE(value) : 0);
}

static Py_ssize_t rp_len(Replay *r)
{
    return (Py_ssize_t)r->n;
}

/* Replay.table() -> {key: value or None}: the replayed table as a dict. */
static PyObject *rp_table(Replay *r, PyObject *unused)
{
    (void)unused;
    PyObject *d = PyDict_New();
    if (!d || !r->ent)
        return d;
    for (size_t i = 0; i < r->cap; i++) {
        const rp_ent *e = &r->ent[i];
        if (!e->hash)
            continue;
        PyObject *k = PyBytes_FromStringAndSize((const char *)r->arena + e->off, e->klen);
        PyObject *v = !k ? NULL
                      : e->vlen == RP_DELETED
                          ? Py_NewRef(Py_None)
                          : PyBytes_FromStringAndSize((const char *)r->arena + e->off + e->klen,
                                                      e->vlen);
        int rc = k && v ? PyDict_SetItem(d, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyMethodDef rp_methods[] = {
    {"apply", (PyCFunction)rp_apply, METH_VARARGS,
     "apply(data, offs, lens, types, start, n) -> index of the first record that is "
     "neither PUT nor DELETE"},
    {"table", (PyCFunction)rp_table, METH_NOARGS, "table() -> the replayed table as a dict"},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods rp_mapping = {
    .mp_length = (lenfunc)rp_len,
    .mp_ass_subscript = (objobjargproc)rp_ass,
};

static PyTypeObject ReplayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "walstate._speedups.Replay",
    .tp_basicsize = sizeof(Replay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Replay(): the table crash recovery builds (apply(), r[key] = value, table())",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rp_init,
    .tp_dealloc = (destructor)rp_dealloc,
    .tp_methods = rp_methods,
    .tp_as_mapping = &rp_mapping,
};

typedef int (*put_fn)(void *w, const void *key, size_t klen, const void *val, size_t vlen,
                      uint64_t *lsn_out);
typedef int (*sync_fn)(void *w, uint64_t lsn, uint64_t *durable_out);

/* Engine limits (walstate/codec.py); anything outside goes to the Python path,
 * which raises the error naming the limit. */
#define MAX_KEY 511
#define MAX_VALUE (64 * 1024 * 1024)

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

static PyObject *hot_put(Hot *h, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *table = h->table;
    if (nargs != 2 || !h->writable || h->busy || !h->put || !table ||
        !PyDict_CheckExact(table) || !h->slow_put || !h->ack)
        goto slow;
    PyObject *key = args[0], *value = args[1];
    if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(value))
        goto slow;
    Py_ssize_t klen = PyBytes_GET_SIZE(key), vlen = PyBytes_GET_SIZE(value);
    if (klen == 0 || klen > MAX_KEY || vlen > MAX_VALUE)
        goto slow;
    uint64_t lsn = 0;
    if (h->put(h->wal, PyBytes_AS_STRING(key), (size_t)klen, PyBytes_AS_STRING(value),
               (size_t)vlen, &lsn) != 0)
        goto slow;  /* would block, or an error the slow path reports */
    if (PyDict_SetItem(table, key, value) < 0)
        return NULL;  /* out of memory: the record is in the log; replay applies it */
    h->last_lsn = lsn;
    h->puts++;
    h->wal_bytes += 28 + 2 + klen + vlen;  /* the record header: docs/FORMAT.md */
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

static PyObject *hot_get(Hot *h, PyObject *const *args, Py_ssize_t nargs)
{
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
        if (klen == 0 || klen > MAX_KEY || !frozen || !PyTuple_CheckExact(frozen) ||
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
    {"put", (PyCFunction)(void (*)(void))hot_put, METH_FASTCALL,
     "put(key, value) -> LSN: Engine.put (the general case in slow_put)"},
    {"get", (PyCFunction)(void (*)(void))hot_get, METH_FASTCALL,
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

static PyTypeObject HotType = {
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
    b->size = 4, b->limit = limit, b->done = 0;
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
    if (klen == 0 || klen > MAX_KEY || vlen > MAX_VALUE || b->size + 7 + klen + vlen > b->limit)
        return 0;
    PyObject *t = PyTuple_Pack(2, key, value);
    if (!t || PyList_Append(b->ops, t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    Py_DECREF(t);
    b->size += 7 + klen + vlen;
    return 1;
}

static PyObject *bo_put(BatchOps *b, PyObject *const *args, Py_ssize_t nargs)
{
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

static PyObject *bo_delete(BatchOps *b, PyObject *const *args, Py_ssize_t nargs)
{
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
    {"put", (PyCFunction)(void (*)(void))bo_put, METH_FASTCALL, "put(key, value): Batch.put"},
    {"delete", (PyCFunction)(void (*)(void))bo_delete, METH_FASTCALL,
     "delete(key): Batch.delete"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef bo_members[] = {
    {"ops", T_OBJECT, offsetof(BatchOps, ops), 0, "the operations: (key, value or None)"},
    {"size", T_PYSSIZET, offsetof(BatchOps, size), 0, "their payload bytes"},
    {"done", T_INT, offsetof(BatchOps, done), 0, "1: committed or discarded"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BatchOpsType = {
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
static PyObject *encode_batch(PyObject *self, PyObject *ops)
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
    size_t total = 4;
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
        total += 7 + (size_t)kl + (size_t)vl;
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
    p += 4;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        PyObject *k = PyTuple_GET_ITEM(op, 0), *v = PyTuple_GET_ITEM(op, 1);
        size_t kl = (size_t)PyBytes_GET_SIZE(k);
        size_t vl = v == Py_None ? 0 : (size_t)PyBytes_GET_SIZE(v);
        p[0] = v == Py_None ? 2 : 1;  /* OP_DELETE, OP_PUT */
        p[1] = (uint8_t)kl, p[2] = (uint8_t)(kl >> 8);
        p[3] = (uint8_t)vl, p[4] = (uint8_t)(vl >> 8), p[5] = (uint8_t)(vl >> 16);
        p[6] = (uint8_t)(vl >> 24);
        memcpy(p + 7, PyBytes_AS_STRING(k), kl);
        if (vl)
            memcpy(p + 7 + kl, PyBytes_AS_STRING(v), vl);
        p += 7 + kl + vl;
    }
    return out;
}

/* sorted_items(table) -> [(key, value), ...] in key order (bytes order), for a
 * dict whose keys are all bytes: the checkpoint's fold order. The sort runs
 * with the GIL released (a writer never waits for it); gathering the items and
 * building the list give the GIL away every ITEMS_PER_HOLD items. Nobody may
 * change the dict meanwhile (the engine's frozen tables never change): a change
 * of its size is RuntimeError. */
#define ITEMS_PER_HOLD 32768

typedef struct {
    uint64_t prefix;     /* the key's first 8 bytes, big-endian, zero-padded */
    const char *p;
    Py_ssize_t len;
    PyObject *k, *v;
} sort_ent;

/* What is sorted: 16 bytes per key, so that the sort moves little memory and
 * compares most keys by their prefix alone. */
typedef struct {
    uint64_t prefix;
    size_t idx;          /* into the sort_ent array */
} sort_key;

static int key_less(const sort_key *x, const sort_key *y, const sort_ent *e)
{
    if (x->prefix != y->prefix)
        return x->prefix < y->prefix;
    const sort_ent *a = &e[x->idx], *b = &e[y->idx];
    Py_ssize_t n = a->len < b->len ? a->len : b->len;
    int c = n > 8 ? memcmp(a->p + 8, b->p + 8, (size_t)(n - 8)) : 0;
    return c ? c < 0 : a->len < b->len;
}

/* A stable merge sort of k[0..n) using tmp (n entries); insertion sort below 16. */
static void merge_sort(sort_key *k, sort_key *tmp, size_t n, const sort_ent *e)
{
    if (n < 16) {
        for (size_t i = 1; i < n; i++) {
            sort_key x = k[i];
            size_t j = i;
            for (; j > 0 && key_less(&x, &k[j - 1], e); j--)
                k[j] = k[j - 1];
            k[j] = x;
        }
        return;
    }
    size_t h = n / 2;
    merge_sort(k, tmp, h, e);
    merge_sort(k + h, tmp + h, n - h, e);
    if (!key_less(&k[h], &k[h - 1], e))
        return;  /* already in order */
    memcpy(tmp, k, n * sizeof *k);
    size_t i = 0, j = h, o = 0;
    while (i < h && j < n)
        k[o++] = key_less(&tmp[j], &tmp[i], e) ? tmp[j++] : tmp[i++];
    while (i < h)
        k[o++] = tmp[i++];
    while (j < n)
        k[o++] = tmp[j++];
}

static void give_gil_away(void)
{
    Py_BEGIN_ALLOW_THREADS
    Py_END_ALLOW_THREADS
}

static PyObject *sorted_items(PyObject *self, PyObject *table)
{
    (void)self;
    if (!PyDict_CheckExact(table)) {
        PyErr_SetString(PyExc_TypeError, "sorted_items: table must be a dict");
        return NULL;
    }
    Py_ssize_t n = PyDict_GET_SIZE(table), i = 0, pos = 0;
    sort_ent *e = n ? PyMem_RawMalloc((size_t)n * sizeof *e) : NULL;
    if (n && !e)
        return PyErr_NoMemory();
    PyObject *k, *v, *out = NULL;
    while (i < n && PyDict_Next(table, &pos, &k, &v)) {
        if (!PyBytes_CheckExact(k)) {
            PyErr_SetString(PyExc_TypeError, "sorted_items: a key is not bytes");
            goto fail;
        }
        sort_ent *x = &e[i++];
        x->p = PyBytes_AS_STRING(k);
        x->len = PyBytes_GET_SIZE(k);
        uint8_t pre[8] = {0};
        memcpy(pre, x->p, (size_t)(x->len < 8 ? x->len : 8));
        x->prefix = 0;
        for (int j = 0; j < 8; j++)
            x->prefix = x->prefix << 8 | pre[j];
        Py_INCREF(k);
        Py_INCREF(v);
        x->k = k, x->v = v;
        if (i % ITEMS_PER_HOLD == 0) {
            give_gil_away();
            if (PyDict_GET_SIZE(table) != n) {
                PyErr_SetString(PyExc_RuntimeError, "sorted_items: the table changed");
                goto fail;
            }
        }
    }
    if (i != n) {
        PyErr_SetString(PyExc_RuntimeError, "sorted_items: the table changed");
        goto fail;
    }
    sort_key *keys = n ? PyMem_RawMalloc(2 * (size_t)n * sizeof *keys) : NULL;
    if (n && !keys) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t j = 0; j < n; j++)
        keys[j].prefix = e[j].prefix, keys[j].idx = (size_t)j;
    Py_BEGIN_ALLOW_THREADS
    merge_sort(keys, keys + n, (size_t)n, e);
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (!out) {
        PyMem_RawFree(keys);
        goto fail;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *t = PyTuple_New(2);
        if (!t) {
            Py_CLEAR(out);
            PyMem_RawFree(keys);
            goto fail_from;
        }
        sort_ent *x = &e[keys[j].idx];
        PyTuple_SET_ITEM(t, 0, x->k);  /* the references taken above move in */
        PyTuple_SET_ITEM(t, 1, x->v);
        x->k = x->v = NULL;
        PyList_SET_ITEM(out, j, t);
        if ((j + 1) % ITEMS_PER_HOLD == 0)
            give_gil_away();  /* the list is ours alone until returned */
    }
    PyMem_RawFree(keys);
    PyMem_RawFree(e);
    return out;
fail:
    n = i;
fail_from:
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_XDECREF(e[j].k);
        Py_XDECREF(e[j].v);
    }
    PyMem_RawFree(e);
    return NULL;
}

static PyMethodDef methods[] = {
    {"sorted_items", sorted_items, METH_O,
     "sorted_items(table) -> its (key, value) items in key order, sorted without the GIL"},
    {"encode_batch", encode_batch, METH_O,
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
        PyModule_AddObjectRef(m, "BatchOps", (PyObject *)&BatchOpsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
