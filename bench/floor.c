/* The floor: a minimal poll() forwarder between a PTY (or tty) and one TCP client.
 * usage: floor TTY PORT  -- listens on 127.0.0.1:PORT, serves one client at a time. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <termios.h>
#include <unistd.h>

static int pump(int from, int to, char *buf, size_t cap) {
    ssize_t n = read(from, buf, cap);
    if (n <= 0) return n < 0 && (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(to, buf + off, n - off);
        if (w < 0 && errno == EAGAIN) { struct pollfd p = {to, POLLOUT, 0}; poll(&p, 1, -1); continue; }
        if (w < 0 && errno != EINTR) return -1;
        if (w > 0) off += w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: floor TTY PORT\n"); return 2; }
    int tty = open(argv[1], O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (tty < 0) { perror("open tty"); return 1; }
    struct termios t; tcgetattr(tty, &t); cfmakeraw(&t); tcsetattr(tty, TCSANOW, &t);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4)) { perror("listen"); return 1; }
    static char buf[65536];
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct pollfd p[2] = {{tty, POLLIN, 0}, {c, POLLIN, 0}};
        for (;;) {
            if (poll(p, 2, -1) < 0 && errno != EINTR) break;
            if ((p[0].revents & POLLIN) && pump(tty, c, buf, sizeof buf) < 0) break;
            if ((p[1].revents & (POLLIN | POLLHUP)) && pump(c, tty, buf, sizeof buf) < 0) break;
        }
        close(c);
    }
}
