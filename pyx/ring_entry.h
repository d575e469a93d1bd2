/*
 * ring_entry.h -- the C entry points of the ring's per-message methods.
 *
 * Producer.put and Consumer.get are METH_FASTCALL | METH_KEYWORDS functions
 * written in ring.pyx with the plain CPython signature, so the common call --
 * positional arguments only -- goes straight to the ring with no argument
 * parsing (a Cython `def` parses keywords, and takes and drops a reference to
 * each default, on every call).  ring_install_method puts such a function
 * into an extension type's dict as an ordinary method descriptor: a bound one
 * is a builtin method, which CPython's specialised CALL invokes directly.
 *
 * ring_parse_args is the rest of the calling convention for those entries:
 * keywords, defaults and the errors CPython's own functions give.
 */
#ifndef RING_ENTRY_H
#define RING_ENTRY_H

#include <Python.h>

/* Install `def` (static storage: the descriptor keeps a pointer to it) as a
 * method of `tp`, replacing any attribute of that name.  0, or -1 with an
 * exception set. */
static int ring_install_method(PyObject *tp, PyMethodDef *def) {
    PyTypeObject *t = (PyTypeObject *)tp;
    PyObject *d = PyDescr_NewMethod(t, def);
    int rc;
    if (d == NULL)
        return -1;
    rc = PyDict_SetItemString(t->tp_dict, def->ml_name, d);
    Py_DECREF(d);
    PyType_Modified(t);
    return rc;
}

/* Match a vectorcall (args[0:nargs] positional, then one value per name in
 * kwnames) against the parameters `names[0:n]`, of which the first `nreq`
 * are required.  out[i] gets a borrowed reference, or NULL when parameter i
 * was not given.  0, or -1 with CPython's TypeError for the call. */
static __attribute__((noinline)) int ring_parse_args(const char *fname, const char *const *names, Py_ssize_t n,
                           Py_ssize_t nreq, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames, PyObject **out) {
    Py_ssize_t i, j, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional argument%s (%zd given)",
                     fname, n, n == 1 ? "" : "s", nargs);
        return -1;
    }
    for (i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    for (j = 0; j < nkw; j++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, j);
        for (i = 0; i < n; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
                break;
        }
        if (i == n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'", fname, key);
            return -1;
        }
        if (out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[i]);
            return -1;
        }
        out[i] = args[nargs + j];
    }
    for (i = 0; i < nreq; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %zd)", fname,
                         names[i], i + 1);
            return -1;
        }
    }
    return 0;
}

#endif /* RING_ENTRY_H */
