/* walstate._speedups.sorted_items: the checkpoint's fold order, sorted without
 * the GIL (see module.c). */
#include "speedups.h"

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

PyObject *sp_sorted_items(PyObject *self, PyObject *table)
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
