/*
 * horde's start gate: the first program of a job's container (after the engine's init).
 *
 *   start-gate FIFO PROGRAM [ARG]...
 *
 * Blocks until the executor writes one byte into FIFO (a named pipe bind-mounted read-only
 * from the job's directory), then executes PROGRAM with its arguments, searched on PATH as
 * the engine would. The executor writes that byte once it holds the job's network namespace:
 * its outputs endpoint (HORDE_EXECUTOR_URL) listens there and, under network = "internet",
 * the job's veth pair is in place. So the job's first instruction can reach its executor.
 *
 * Linked statically (build.rs): it runs in any image, whatever libc the image has or lacks.
 * Exit statuses when it cannot run the job: 125 (the executor never released it), 126 (not
 * executable), 127 (not found), as shells and engines use them.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fputs("horde start gate: usage: start-gate FIFO PROGRAM [ARG]...\n", stderr);
        return 125;
    }
    int fd;
    do {
        fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        fprintf(stderr, "horde start gate: %s: %s\n", argv[1], strerror(errno));
        return 125;
    }
    char byte;
    ssize_t n;
    do {
        n = read(fd, &byte, 1);
    } while (n < 0 && errno == EINTR);
    if (n != 1) {
        fputs("horde start gate: the executor did not release the job\n", stderr);
        return 125;
    }
    close(fd);
    execvp(argv[2], argv + 2);
    int error = errno;
    fprintf(stderr, "horde start gate: %s: %s\n", argv[2], strerror(error));
    return error == ENOENT || error == ENOTDIR ? 127 : 126;
}
