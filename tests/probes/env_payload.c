/* Agent code that glibc loads on the agent package's say-so: as a gconv
 * module (GCONV_PATH + LOCPATH + LC_ALL) or a preloaded library (LD_PRELOAD).
 * Whichever process loads it reports on stderr (the agent's log) what it could
 * reach: "PAYLOAD sys=ok|denied root=ok|denied cmdline=..." (sys: a sysfs file
 * no Landlock rule allows; root: listing /). */
#include <dirent.h>
#include <fcntl.h>
#include <gconv.h>
#include <stdio.h>
#include <unistd.h>

static const char *reach_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return "denied";
    close(fd);
    return "ok";
}

static const char *reach_dir(const char *path) {
    DIR *dir = opendir(path);
    if (!dir)
        return "denied";
    closedir(dir);
    return "ok";
}

__attribute__((constructor)) static void payload(void) {
    char cmdline[512] = {0}, line[768];
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, cmdline, sizeof cmdline - 1);
    if (fd >= 0)
        close(fd);
    for (ssize_t i = 0; i < n; i++)
        if (cmdline[i] == '\0')
            cmdline[i] = ' ';
    int len = snprintf(line, sizeof line, "PAYLOAD sys=%s root=%s cmdline=%s\n",
                       reach_file("/sys/devices/system/cpu/online"), reach_dir("/"), cmdline);
    if (len > 0)
        write(2, line, len < (int) sizeof line ? len : (int) sizeof line - 1);
}

/* A gconv module's entry points; it converts nothing. */
int gconv_init(struct __gconv_step *step) { return __GCONV_NOCONV; }

int gconv(struct __gconv_step *step, struct __gconv_step_data *data,
          const unsigned char **in, const unsigned char *end, unsigned char **out,
          size_t *irreversible, int flush, int consume) {
    return __GCONV_NOCONV;
}
