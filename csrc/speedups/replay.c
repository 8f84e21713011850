/* walstate._speedups.Replay: recovery's table, in C (see module.c). */
#include "speedups.h"

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
        size_t klen = len >= WAL_PUT_HDR_SIZE ? (size_t)(p[0] | p[1] << 8) : 0;
        if (klen == 0 || WAL_PUT_HDR_SIZE + klen > len) {
            PyErr_Format(PyExc_ValueError, "record %zd: malformed PUT payload", i);
            return -1;
        }
        kv->key = p + WAL_PUT_HDR_SIZE, kv->klen = klen;
        kv->val = p + WAL_PUT_HDR_SIZE + klen, kv->vlen = (size_t)len - WAL_PUT_HDR_SIZE - klen;
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

PyTypeObject ReplayType = {
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
