/* The injection classifier's n-gram scorer in C (optional: plinth.guardrails.detectors.injection
 * falls back to its pure-Python scorer, which gives the same scores, when this is not built).
 *
 * Why hand-written: the pure-Python scorer creates one string object per character n-gram, hashes
 * it, counts it in a Counter and looks it up in a 66,000-entry dict: about 50 microseconds for a
 * one-line prompt in a warm loop and 90-130 in the running gateway, the largest single cost of the
 * `standard` guardrails profile. numpy (a dozen array calls, 250 microseconds of fixed cost) and
 * pyahocorasick (one Python tuple per match: 39 against 50 microseconds) did not help (measured,
 * docs/benchmarks.md). Here no object is created per n-gram: each is hashed incrementally from its
 * code points and looked up in an open-addressing table built once from the model's vocabulary.
 *
 * Table(weights) takes the classifier's {n-gram: complex(idf * coef, idf * idf)} dict.
 * Table.score(folded) returns complex(sum tf * idf * coef, sum tf^2 * idf^2) over the vocabulary
 * n-grams of `folded` (1 to 5 characters), tf = 1 + log(count): what `decision_python` sums.
 * A match is decided by a 64-bit hash of the n-gram's code points and its length; two vocabulary
 * n-grams with the same hash are refused when the table is built (the caller then keeps the
 * Python scorer), and a text n-gram outside the vocabulary matches one by chance with
 * probability about 66,000 / 2^64 per lookup. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define MAX_N 5

typedef struct {
    uint64_t hash; /* 0: empty slot */
    double dot;    /* idf * coef */
    double norm;   /* idf * idf */
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *entries;
    uint32_t *counts; /* per slot, during one `score` call; zero between calls */
    uint64_t mask;
    Py_ssize_t size;
} TableObject;

static inline uint64_t step(uint64_t h, Py_UCS4 c)
{
    h ^= (uint64_t)c + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

static inline uint64_t finish(uint64_t h, int n)
{
    h ^= (uint64_t)n * 0xc4ceb9fe1a85ec53ULL;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 29;
    return h ? h : 1;
}

/* The hash of a whole vocabulary n-gram: what `score` reaches step by step along the text. */
static uint64_t hash_of(PyObject *gram, int n)
{
    int kind = PyUnicode_KIND(gram);
    const void *data = PyUnicode_DATA(gram);
    uint64_t h = 0;
    for (int k = 0; k < n; k++)
        h = step(h, PyUnicode_READ(kind, data, k));
    return finish(h, n);
}

static void Table_dealloc(TableObject *self)
{
    PyMem_Free(self->entries);
    PyMem_Free(self->counts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Table_init(TableObject *self, PyObject *args, PyObject *kwds)
{
    (void)kwds;
    PyObject *weights;
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &weights))
        return -1;
    Py_ssize_t n = PyDict_Size(weights);
    uint64_t capacity = 16;
    while (capacity < (uint64_t)(2 * n + 2))
        capacity <<= 1;
    PyMem_Free(self->entries);
    PyMem_Free(self->counts);
    self->entries = PyMem_Calloc(capacity, sizeof(Entry));
    self->counts = PyMem_Calloc(capacity, sizeof(uint32_t));
    if (self->entries == NULL || self->counts == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->mask = capacity - 1;
    self->size = 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(weights, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || !PyComplex_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "weights must map str n-grams to complex numbers");
            return -1;
        }
        Py_ssize_t len = PyUnicode_GET_LENGTH(key);
        if (len < 1 || len > MAX_N) {
            PyErr_SetString(PyExc_ValueError, "n-grams must be 1 to 5 characters long");
            return -1;
        }
        uint64_t h = hash_of(key, (int)len);
        uint64_t slot = h & self->mask;
        while (self->entries[slot].hash != 0) {
            if (self->entries[slot].hash == h) {
                PyErr_SetString(PyExc_ValueError, "two n-grams of the vocabulary share a hash");
                return -1;
            }
            slot = (slot + 1) & self->mask;
        }
        self->entries[slot].hash = h;
        self->entries[slot].dot = PyComplex_RealAsDouble(value);
        self->entries[slot].norm = PyComplex_ImagAsDouble(value);
        self->size++;
    }
    return 0;
}

static PyObject *Table_score(TableObject *self, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "score() takes a str");
        return NULL;
    }
    if (self->entries == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Table was not initialised");
        return NULL;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    /* Slots matched at least once, to sum and reset afterwards: at most MAX_N per position. */
    uint64_t small[256];
    uint64_t *touched = small;
    if ((size_t)length * MAX_N > sizeof(small) / sizeof(small[0])) {
        touched = PyMem_Malloc((size_t)length * MAX_N * sizeof(uint64_t));
        if (touched == NULL)
            return PyErr_NoMemory();
    }
    Py_ssize_t n_touched = 0;
    const Entry *entries = self->entries;
    uint32_t *counts = self->counts;
    const uint64_t mask = self->mask;
    for (Py_ssize_t i = 0; i < length; i++) {
        uint64_t h = 0;
        int top = length - i < MAX_N ? (int)(length - i) : MAX_N;
        for (int n = 1; n <= top; n++) {
            h = step(h, PyUnicode_READ(kind, data, i + n - 1));
            uint64_t key = finish(h, n);
            uint64_t slot = key & mask;
            while (entries[slot].hash != 0 && entries[slot].hash != key)
                slot = (slot + 1) & mask;
            if (entries[slot].hash == 0)
                continue;
            if (counts[slot]++ == 0)
                touched[n_touched++] = slot;
        }
    }
    double dot = 0.0, norm = 0.0;
    for (Py_ssize_t t = 0; t < n_touched; t++) {
        uint64_t slot = touched[t];
        uint32_t count = counts[slot];
        counts[slot] = 0;
        double tf = count > 1 ? 1.0 + log((double)count) : 1.0;
        dot += tf * entries[slot].dot;
        norm += tf * tf * entries[slot].norm;
    }
    if (touched != small)
        PyMem_Free(touched);
    return PyComplex_FromDoubles(dot, norm);
}

static Py_ssize_t Table_len(TableObject *self)
{
    return self->size;
}

static PyMethodDef Table_methods[] = {
    {"score", (PyCFunction)Table_score, METH_O,
     "complex(sum tf*idf*coef, sum tf^2*idf^2) over the vocabulary n-grams of a folded text"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Table_as_sequence = {
    .sq_length = (lenfunc)Table_len,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "plinth.guardrails.detectors._ngrams.Table",
    .tp_doc = PyDoc_STR("The injection classifier's vocabulary as a hash table of n-gram weights."),
    .tp_basicsize = sizeof(TableObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
    .tp_as_sequence = &Table_as_sequence,
};

static struct PyModuleDef ngrams_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_ngrams",
    .m_doc = "Character n-gram scoring for the injection classifier (see _ngrams.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__ngrams(void)
{
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&ngrams_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(module, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
