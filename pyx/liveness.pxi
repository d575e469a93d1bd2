# Process liveness for shared-memory roles (included by ring.pyx and
# sched.pyx: one source). A role holder records its pid, its start time and
# its pid namespace; a checker calls it dead when the pid is gone, a zombie,
# or now names a process with another start time (the kernel reused the pid).
#
# Pid namespaces: containers that share /dev/shm but not a pid namespace
# (Kubernetes pods, docker --ipc=container:) cannot see each other's pids.
# A holder whose recorded namespace differs from the checker's is therefore
# always alive for it: its role is released only by its own close(), by a
# checker in its namespace, or by removing the region. 0 = unknown (no
# /proc/self/ns): liveness by pid and start time, as before.
#
# The including module cimports eng_pid_alive (eng_atomic) and uint64_t /
# int32_t.

import os as _lv_os


cdef uint64_t _stat_start(bytes stat):
    """Field 22 of /proc/PID/stat (start time, clock ticks after boot), 0 if
    unreadable. The command name (field 2) may hold spaces: count from ')'."""
    cdef Py_ssize_t i = stat.rfind(b")")
    if i < 0:
        return 0
    fields = stat[i + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


cdef int32_t _start_pid = 0
cdef uint64_t _start_val = 0


cdef uint64_t _my_start():
    """This process's start time (cached per pid: a forked child has its own)."""
    global _start_pid, _start_val
    cdef int32_t me = _lv_os.getpid()
    if me != _start_pid:
        try:
            with open("/proc/self/stat", "rb") as f:
                _start_val = _stat_start(f.read())
        except OSError:
            _start_val = 0  # no /proc (macOS): liveness by pid alone
        _start_pid = me
    return _start_val


cdef int32_t _ns_pid = 0
cdef uint64_t _ns_val = 0


cdef uint64_t _my_ns():
    """Inode of this process's pid namespace (/proc/self/ns/pid), 0 if
    unknown; cached per pid (a forked child may be in another one after
    unshare)."""
    global _ns_pid, _ns_val
    cdef int32_t me = _lv_os.getpid()
    if me != _ns_pid:
        try:
            _ns_val = _lv_os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            _ns_val = 0
        _ns_pid = me
    return _ns_val


cdef bint _alive(int32_t pid, uint64_t start, uint64_t ns=0):
    """The process exists, is not a zombie (a killed child whose parent has
    not reaped it yet is dead for us: it will never read again), and, when
    `start` is known, is the process that took the role: a pid reused by a
    new process after the owner died has another start time.  A holder in
    another pid namespace (`ns` known and not ours) is alive: we cannot
    tell."""
    cdef uint64_t now_start, mine
    if ns != 0:
        mine = _my_ns()
        if mine != 0 and mine != ns:
            return True
    if not eng_pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc (macOS) or a race with its exit: trust kill(0)
    i = stat.rfind(b")")
    if i >= 0 and stat[i + 2:i + 3] in (b"Z", b"X"):
        return False
    if start != 0:
        now_start = _stat_start(stat)
        if now_start != 0 and now_start != start:
            return False
    return True
